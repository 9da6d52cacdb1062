"""The scan from a given state and with grouped B, C: selective_scan_ref and selective_scan_fn with
initial_state = h_0 against the float64 recurrence (scan_truth.truth), their gradients (dL/dh_0 included)
against each other and against finite differences, a sequence scanned in two pieces against the whole, and
B, C of shape (b, G, n, l) (mamba_ssm's groups) against the recurrence reading each channel's group.
"""
import pytest
import torch

import selective_scan
from scan_truth import LAYOUT_IDS, LAYOUTS, check_against_truth, grads_of, make_inputs, rel_err
from selective_scan import selective_scan_fn, selective_scan_ref

SCANS = {"ref": selective_scan_ref, "fn": selective_scan_fn}


def with_state(kw, seed=0):
    """kw plus a random initial state (b, d, n) of its dtype, of the size of a state after many steps."""
    b, d, _ = kw["u"].shape
    n = kw["A"].shape[1]
    return kw | {"initial_state": torch.randn(b, d, n, generator=torch.Generator().manual_seed(seed),
                                              dtype=kw["u"].dtype) * 3}


def upstream(kw, seed):
    """Random upstream gradients for y (b, d, l) and the last state (b, d, n)."""
    (b, d, l), n, g = kw["u"].shape, kw["A"].shape[1], torch.Generator().manual_seed(seed)
    return (torch.randn((b, d, l), generator=g, dtype=kw["u"].dtype),
            torch.randn((b, d, n), generator=g, dtype=kw["u"].dtype))


def force_gpu_chunks(monkeypatch):
    """The GPU's chunk rule (short chunks, a log-depth chain) on the CPU."""
    rule = selective_scan._chunk_len
    monkeypatch.setattr(selective_scan, "_chunk_len", lambda l, slab, on_gpu: rule(l, slab, True))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [1, 7, 300])
def test_initial_state_against_the_recurrence(l, layout, dtype, tol):
    kw = with_state(make_inputs(2, 3, 4, l, *layout, dtype=dtype, seed=l), seed=l)
    check_against_truth(kw, tol)
    # a zero initial state is no initial state
    zero = kw | {"initial_state": torch.zeros_like(kw["initial_state"])}
    plain = {k: v for k, v in kw.items() if k != "initial_state"}
    for scan in SCANS.values():
        assert torch.equal(scan(**zero), scan(**plain))


@pytest.mark.parametrize("gpu_chunks", [False, True], ids=["cpu-chunks", "gpu-chunks"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [1, 5, 300])
def test_initial_state_gradients_match_the_reference(l, layout, gpu_chunks, monkeypatch):
    """Several chunks at l = 300 (CPU rule: 17, GPU rule: 75), one at l <= 5: dL/dh_0 flows back through
    the chain of chunks as well as through the first one."""
    if gpu_chunks:
        force_gpu_chunks(monkeypatch)
    kw = with_state(make_inputs(2, 3, 4, l, *layout, dtype=torch.float64, seed=300 + l), seed=l)
    gy, gh = upstream(kw, l)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    assert "initial_state" in g_fn and g_fn["initial_state"].shape == kw["initial_state"].shape
    assert g_fn["initial_state"].abs().max() > 0
    for k in g_ref:
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, (k, rel_err(g_fn[k], g_ref[k]))


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("l", [3, 40])
def test_gradcheck_with_initial_state(l, layout):
    """Finite differences: every input of the fast path, h_0 included (l = 40: several chunks)."""
    kw = with_state(make_inputs(1, 2, 3, l, *layout, dtype=torch.float64, seed=9), seed=9)
    names = ["u", "delta", "A", "B", "C", "initial_state"]
    leaves = [kw[k].clone().requires_grad_() for k in names]

    def f(*xs):
        y, h = selective_scan_fn(**(kw | dict(zip(names, xs))), return_last_state=True)
        return y, h
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("gpu_chunks", [False, True], ids=["cpu-chunks", "gpu-chunks"])
@pytest.mark.parametrize("scan", SCANS, ids=list(SCANS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l,k", [(2, 1), (300, 1), (300, 299), (600, 256), (601, 17)])
def test_two_pieces_from_the_last_state_equal_the_whole(l, k, layout, scan, gpu_chunks, monkeypatch):
    """Scan [0, k), then [k, l) from its last state: the same y, the same last state and the same gradients
    for every input as one scan of [0, l)."""
    if gpu_chunks:
        force_gpu_chunks(monkeypatch)
    scan = SCANS[scan]
    kw = make_inputs(2, 3, 4, l, *layout, dtype=torch.float64, seed=k)
    gy, gh = upstream(kw, k)
    leaves = {name: v.clone().requires_grad_() for name, v in kw.items() if isinstance(v, torch.Tensor)}
    whole = kw | leaves
    y, h = scan(**whole, return_last_state=True)

    def piece(lo, hi, state):
        cut = {name: (v[..., lo:hi] if name in ("u", "delta", "z") or (name in "BC" and v.dim() == 3) else v)
               for name, v in whole.items()}
        return scan(**cut, initial_state=state, return_last_state=True)
    y1, h1 = piece(0, k, None)
    y2, h2 = piece(k, l, h1)
    assert rel_err(torch.cat([y1, y2], dim=-1), y) < 1e-12 and rel_err(h2, h) < 1e-12
    params = list(leaves.values())
    g_whole = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), params, allow_unused=True,
                                  materialize_grads=True)
    g_pieces = torch.autograd.grad((torch.cat([y1, y2], -1) * gy).sum() + (h2 * gh).sum(), params,
                                   allow_unused=True, materialize_grads=True)
    for name, a, b in zip(leaves, g_pieces, g_whole):
        assert rel_err(a, b) < 1e-10, (name, rel_err(a, b))


def test_an_initial_state_of_the_wrong_shape_is_named():
    kw = make_inputs(2, 3, 4, 5, True, True)
    for scan in SCANS.values():
        with pytest.raises(ValueError, match=r"^initial_state must be \(b, d, n\) = \(2, 3, 4\), the state these "
                                             r"inputs update; got \(2, 4, 3\)$"):
            scan(**kw, initial_state=torch.zeros(2, 4, 3))


# ---- B and C in groups of channels (b, G, n, l) -----------------------------------------------------------------

@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("C_kind", ["grouped", "shared", "fixed"])
@pytest.mark.parametrize("l", [1, 300])
def test_grouped_B_and_C_against_the_recurrence(l, C_kind, G):
    """B (b, G, n, l); C grouped the same way, shared by all channels (b, n, l), or fixed (d, n); with an
    initial state; gradients of the fast path against the reference's."""
    b, d, n = 2, 6, 4
    kw = with_state(make_inputs(b, d, n, l, True, C_kind == "shared", dtype=torch.float64, seed=G), seed=G)
    g = torch.Generator().manual_seed(10 + G)
    kw["B"] = torch.randn(b, G, n, l, generator=g, dtype=torch.float64)
    if C_kind == "grouped":
        kw["C"] = torch.randn(b, G, n, l, generator=g, dtype=torch.float64)
    check_against_truth(kw, 1e-10)
    gy, gh = upstream(kw, G)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    for k in g_ref:
        assert g_fn[k].shape == kw[k].shape
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, (k, rel_err(g_fn[k], g_ref[k]))


def test_groups_that_do_not_divide_the_channels_are_refused():
    kw = make_inputs(1, 6, 4, 5, True, True)
    kw["B"] = torch.randn(1, 4, 4, 5)
    for scan in SCANS.values():
        with pytest.raises(ValueError, match=r"one G that divides d = 6; got G = \[4\]"):
            scan(**kw)
    kw["B"], kw["C"] = torch.randn(1, 2, 4, 5), torch.randn(1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"got G = \[2, 3\]"):
        selective_scan_fn(**kw)


@pytest.mark.parametrize("l", [5, 300])
def test_initial_state_with_a_selective_A(l):
    """A_scale (A_t = A_scale_t A in the decay) and h_0 together: the recurrence, and the gradients of both."""
    kw = with_state(make_inputs(2, 3, 4, l, True, True, dtype=torch.float64, seed=l), seed=l)
    kw["A_scale"] = torch.rand(2, 3, l, generator=torch.Generator().manual_seed(l), dtype=torch.float64) + 0.5
    check_against_truth(kw, 1e-10)
    gy, gh = upstream(kw, l)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    for k in g_ref:
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, (k, rel_err(g_fn[k], g_ref[k]))


@pytest.mark.parametrize("dt", [1e-7, 1e-6, 1e-5])
def test_a_token_kept_for_2_to_the_20_steps_loses_only_rounding(dt):
    """Induction Heads at 2^20 needs a token written once and read a million steps later. In float32, with the
    small Δ that keeps it, the fast scan's product of 2^20 decays exp(Δ A) stays within 2e-4 of the exact
    exp(Δ A (l - 1)): float32 rounding of the decay does not erase such a memory."""
    l, A = 2 ** 20, -torch.tensor([1.0, 2.0, 4.0, 8.0])
    u = torch.zeros(1, 1, l)
    u[..., 0] = 1.0                                                        # the token, written at step 0
    B, C = torch.ones(1, 4, l), torch.zeros(1, 4, l)
    C[..., -1] = 1.0                                                       # read out at the last step only
    y = selective_scan_fn(u, torch.full((1, 1, l), dt), A[None], B, C)
    exact = (dt * torch.exp(dt * A.double() * (l - 1))).sum().item()     # h_0 = Δ u_0 B, decayed l - 1 times
    assert abs(y[0, 0, -1].item() - exact) / exact < 2e-4
