"""ssd.py against a float64 recurrence written out below: the sequential definition, the chunked algorithm at
any length and chunk size, with groups, D, an initial state and the final state; gradients (against each other
and gradcheck); extreme Δ and A without NaN; two pieces from the last state equal the whole; the one-step
update; memory that grows linearly with the length."""
import pytest
import torch

from scan_truth import AllocatedBytes
from ssd import ssd_chunked, ssd_ref, ssd_state_update


def truth(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_states=None):
    """The recurrence of Mamba-2's SSD, one head and one step at a time, in float64: (y (b, l, h, p), h_l)."""
    x, dt, A, B, C = (t.detach().double() for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.detach().double()
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64) if initial_states is None \
        else initial_states.detach().double().clone()
    y = torch.zeros(b, l, h, p, dtype=torch.float64)
    for t in range(l):
        for head in range(h):
            g = head // heads_per_group
            state[:, head] = (torch.exp(dt[:, t, head] * A[head])[:, None, None] * state[:, head]
                              + (dt[:, t, head, None] * x[:, t, head])[:, :, None] * B[:, t, g, None, :])
            y[:, t, head] = state[:, head] @ C[:, t, g] if b == 1 else torch.einsum("bpn,bn->bp", state[:, head],
                                                                                      C[:, t, g])
            if D is not None:
                y[:, t, head] += D[head].double() * x[:, t, head]
    return y, state


def inputs(b=2, l=37, h=4, p=3, n=5, g=2, dtype=torch.float32, seed=0, state=True, dt_scale=1.0, A_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    kw = dict(x=rnd(b, l, h, p), dt=rnd(b, l, h) * 0.5 - 1.0, A=-torch.exp(rnd(h) * 0.5) * A_scale,
              B=rnd(b, l, g, n), C=rnd(b, l, g, n), D=rnd(h), dt_bias=rnd(h) * 0.3, dt_softplus=True,
              initial_states=rnd(b, h, p, n) if state else None)
    if dt_scale != 1.0:  # Δ itself, no softplus: the extremes exactly
        kw.update(dt=torch.rand(b, l, h, generator=gen, dtype=torch.float64) * dt_scale, dt_bias=None,
                  dt_softplus=False)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chunk", [1, 8, 16, 64, 256])
@pytest.mark.parametrize("l", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_and_sequential_equal_the_recurrence(l, chunk, groups):
    """float32, lengths that are not multiples of the chunk, with and without an initial state."""
    for state in (True, False):
        kw = inputs(l=l, g=groups, state=state, seed=l + chunk)
        y_true, h_true = truth(**kw)
        for scan, extra in ((ssd_ref, {}), (ssd_chunked, {"chunk_size": chunk})):
            y, h = scan(**kw, return_final_states=True, **extra)
            assert y.dtype == torch.float32 and y.shape == y_true.shape and h.shape == h_true.shape
            assert rel_err(y, y_true) < 1e-5 and rel_err(h, h_true) < 1e-5, (scan.__name__, state)
            assert torch.equal(scan(**kw, **extra), y)


@pytest.mark.parametrize("dt_scale, A_scale", [(1e-6, 1.0), (50.0, 1.0), (50.0, 30.0), (1.0, 1e-5)])
def test_extreme_steps_and_decays_stay_finite_and_exact(dt_scale, A_scale):
    """Δ from ~0 to 50 and A down to -100: decays of exp(-5000) per step underflow to 0, never to NaN."""
    kw = inputs(l=70, dt_scale=dt_scale, A_scale=A_scale, seed=3)
    y_true, h_true = truth(**kw)
    for chunk in (16, 64):
        y, h = ssd_chunked(**kw, return_final_states=True, chunk_size=chunk)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert rel_err(y, y_true) < 1e-5 and rel_err(h, h_true) < 1e-5


def test_gradients_of_the_chunked_path_match_the_sequential_ones():
    kw = inputs(l=45, dtype=torch.float64, seed=4)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    grads = []
    for scan, extra in ((ssd_ref, {}), (ssd_chunked, {"chunk_size": 16})):
        leaves = {k: kw[k].clone().requires_grad_() for k in names}
        y, h = scan(**(kw | leaves), return_final_states=True, **extra)
        g = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (h * torch.randn(
            h.shape, generator=g, dtype=h.dtype)).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, a, b in zip(names, *grads):
        assert rel_err(a, b) < 1e-10, name


def test_gradcheck_of_the_chunked_path():
    kw = inputs(b=1, l=11, h=2, p=2, n=3, g=1, dtype=torch.float64, seed=5)
    names = ["x", "dt", "A", "B", "C", "D", "initial_states"]

    def f(*xs):
        return ssd_chunked(**(kw | dict(zip(names, xs))), return_final_states=True, chunk_size=4)
    assert torch.autograd.gradcheck(f, [kw[k].clone().requires_grad_() for k in names], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 30, 64, 99])
def test_two_pieces_from_the_final_state_equal_the_whole(k):
    kw = inputs(l=100, seed=k)
    y, h = ssd_chunked(**kw, return_final_states=True, chunk_size=32)

    def cut(lo, hi):
        return {n: (v[:, lo:hi] if n in ("x", "dt", "B", "C") else v) for n, v in kw.items()}
    y1, h1 = ssd_chunked(**cut(0, k), return_final_states=True, chunk_size=32)
    y2, h2 = ssd_chunked(**(cut(k, 100) | {"initial_states": h1}), return_final_states=True, chunk_size=32)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < 1e-5 and rel_err(h2, h) < 1e-5


def test_one_step_update_is_one_step_of_the_recurrence():
    kw = inputs(l=6, seed=6)
    y_true, h_true = truth(**kw)
    state = kw["initial_states"]
    for t in range(6):
        state, y = ssd_state_update(state, kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t],
                                    kw["D"], kw["dt_bias"], True)
        assert rel_err(y, y_true[:, t]) < 1e-5
    assert rel_err(state, h_true) < 1e-5


def test_bad_shapes_are_named():
    kw = inputs(h=4, g=3)
    with pytest.raises(ValueError, match="divides the h = 4 heads; got 3 and 3"):
        ssd_chunked(**kw)
    kw = inputs()
    with pytest.raises(ValueError, match=r"initial_states must be \(b, h, p, n\) = \(2, 4, 3, 5\)"):
        ssd_ref(**(kw | {"initial_states": torch.zeros(2, 4, 5, 3)}))


def test_memory_grows_linearly_with_the_length():
    """Bytes allocated by a forward at l = 512 and 2048 (chunks of 64): 4x the length, about 4x the bytes;
    a (l, l) matrix anywhere, or a chain over chunks kept as a (c, c) matrix, would give 16x."""
    totals = []
    for l in (512, 2048):
        kw = inputs(b=1, l=l, h=2, p=4, n=4, g=1, state=False)
        with AllocatedBytes() as mode:
            ssd_chunked(**kw, chunk_size=64)
        totals.append(mode.total)
    assert 3.5 < totals[1] / totals[0] < 4.5, totals
