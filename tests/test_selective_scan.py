"""Tests of selective_scan.py against an independent float64 recurrence (truth, in scan_truth.py).

Covers: forward agreement of selective_scan_ref and selective_scan_fn over many lengths, B/C layouts
and options; extreme Δ and A; the one-step update; dtypes and autocast; and cases by hand. Gradients:
test_selective_scan_grad.py; memory: test_selective_scan_memory.py; the optional A_scale (selective
A): test_selective_scan_A_scale.py.
CPU, one thread, well under a minute.
"""
import itertools
import math

import pytest
import torch

from scan_truth import LAYOUT_IDS, LAYOUTS, SCANS, check_against_truth, make_inputs, rel_err, tensors, truth
from selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update

# ---- 1. forward agreement with the truth ------------------------------------------------------------------

@pytest.mark.parametrize("options", ["none", "all"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [1, 2, 3, 7, 64, 127, 1000, 4097])
def test_forward_matches_truth(l, layout, options):
    on = options == "all"
    kw = make_inputs(2, 3, 4, l, *layout, D=on, z=on, bias=on, softplus=on, seed=l)
    check_against_truth(kw, 1e-5)


@pytest.mark.parametrize("D,z,bias,softplus", list(itertools.product([False, True], repeat=4)))
def test_forward_options_matches_truth(D, z, bias, softplus):
    layout = LAYOUTS[(D + 2 * z) % 4]  # every layout meets every option somewhere
    kw = make_inputs(2, 3, 4, 127, *layout, D=D, z=z, bias=bias, softplus=softplus, seed=7)
    check_against_truth(kw, 1e-5)


@pytest.mark.parametrize("b,d,n,l", [(1, 1024, 256, 3),    # b*d*n = 2^18: a single chunk, the plain loop
                                     (1, 128, 128, 64),    # b*d*n = 2^14: 8 chunks (at most sqrt(l))
                                     (1, 64, 256, 300),    # b*d*n = 2^14: 16 chunks of 19 with padding
                                     (3, 5, 7, 50)])       # odd sizes, 7 chunks of 8 with padding
def test_forward_chunking_regimes(b, d, n, l):
    kw = make_inputs(b, d, n, l, True, False, seed=3)
    check_against_truth(kw, 1e-5, scans=("fn",))


def test_forward_transposed_views():
    """The model passes Δ, B and C as transposed views of (b, l, k) tensors: same results as contiguous."""
    kw = make_inputs(2, 6, 4, 130, True, True, seed=5)
    views = dict(kw)
    for k in ("u", "delta", "B", "C", "z"):
        views[k] = kw[k].transpose(1, 2).contiguous().transpose(1, 2)
        assert not views[k].is_contiguous()
    for scan in SCANS.values():
        y, h = scan(**kw, return_last_state=True)
        yv, hv = scan(**views, return_last_state=True)
        assert rel_err(yv, y) < 1e-6 and rel_err(hv, h) < 1e-6   # only the rounding of vectorised ops differs


def test_no_grad_path_matches_grad_path():
    """Without autograd the fast path keeps no states: it must still give the same numbers."""
    kw = make_inputs(2, 3, 4, 300, True, False, seed=11)
    with torch.no_grad():
        y0, h0 = selective_scan_fn(**kw, return_last_state=True)
    grads = {k: v.clone().requires_grad_() for k, v in tensors(kw).items()}
    y1, h1 = selective_scan_fn(**(kw | grads), return_last_state=True)
    assert y1.requires_grad
    torch.testing.assert_close(y1.detach(), y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1.detach(), h0, rtol=1e-6, atol=1e-6)


# ---- 2. extreme ranges ------------------------------------------------------------------------------------

def extreme_inputs(l, B_sel, C_sel, seed=0):
    """Δ from 0 (exactly, in places) up to 20; A from -100 up to -1e-4; Δ|A| up to 2000."""
    g = torch.Generator().manual_seed(seed)
    b, d, n = 2, 4, 4
    delta = torch.rand(b, d, l, generator=g) * 20
    delta[torch.rand(b, d, l, generator=g) < 0.2] = 0.0
    delta[:, :, :5] = 20.0                      # several steps of Δ = 20 in a row, at the start
    delta[:, :, -3:] = 0.0                      # and exactly zero at the end
    A = -torch.exp(torch.empty(d, n).uniform_(math.log(1e-4), math.log(100), generator=g))
    A[0, 0], A[1, 1], A[2, 2] = -100.0, -1e-4, -1.0
    return dict(u=torch.randn(b, d, l, generator=g), delta=delta, A=A,
                B=torch.randn(b, n, l, generator=g) if B_sel else torch.randn(d, n, generator=g),
                C=torch.randn(b, n, l, generator=g) if C_sel else torch.randn(d, n, generator=g),
                D=torch.randn(d, generator=g), z=torch.randn(b, d, l, generator=g))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [7, 1000, 4097])
def test_extreme_ranges(l, layout):
    kw = extreme_inputs(l, *layout, seed=l)
    assert (kw["delta"] == 0).any() and (kw["delta"] * -kw["A"].min()).max() == 2000
    check_against_truth(kw, 1e-5)
    # gradients: finite everywhere, and the fast path agrees with the reference
    grads = {}
    g = torch.Generator().manual_seed(1)
    gy, gh = torch.randn(2, 4, l, generator=g), torch.randn(2, 4, 4, generator=g)
    for name, scan in SCANS.items():
        leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
        y, h = scan(**leaves, return_last_state=True)
        grads[name] = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), list(leaves.values()))
        for k, gr in zip(leaves, grads[name]):
            assert torch.isfinite(gr).all(), (name, k)
    for k, gf, gr in zip(kw, grads["fn"], grads["ref"]):
        assert rel_err(gf, gr) < 1e-4, (k, rel_err(gf, gr))


def test_extreme_softplus_large_delta():
    """softplus(Δ + bias) with Δ + bias up to ~40 (softplus ~ identity there) and A = -100."""
    kw = extreme_inputs(513, True, True, seed=2)
    kw["delta"] = kw["delta"] * 2 - 5
    kw["delta_bias"] = torch.full((4,), 3.0)
    kw["delta_softplus"] = True
    check_against_truth(kw, 1e-5)


# ---- 3. the one-step update -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_state_update_reproduces_scan(layout, dtype):
    b, d, n, l = 2, 3, 4, 40
    kw = make_inputs(b, d, n, l, *layout, dtype=dtype, seed=21)
    y_ref, h_ref = selective_scan_ref(**kw, return_last_state=True)
    state = torch.zeros(b, d, n, dtype=dtype)
    ys = []
    for t in range(l):
        B_t = kw["B"][:, :, t] if layout[0] else kw["B"][None]
        C_t = kw["C"][:, :, t] if layout[1] else kw["C"][None]
        state, y_t = selective_state_update(state, kw["u"][:, :, t], kw["delta"][:, :, t], kw["A"], B_t, C_t,
                                            D=kw["D"], z=kw["z"][:, :, t], delta_bias=kw["delta_bias"],
                                            delta_softplus=True)
        assert state.shape == (b, d, n) and state.dtype == dtype and y_t.shape == (b, d) and y_t.dtype == dtype
        ys.append(y_t)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert rel_err(torch.stack(ys, -1), y_ref) < tol
    assert rel_err(state, h_ref) < tol
    if dtype == torch.float64:
        y_true, h_true = truth(**kw)
        assert rel_err(torch.stack(ys, -1), y_true) < 1e-12 and rel_err(state, h_true) < 1e-12


def test_state_update_after_prefill():
    """Prefill with the fast scan, then continue one step at a time: same as scanning everything at once."""
    kw = make_inputs(2, 3, 4, 30, True, True, seed=8)
    y_all, h_all = selective_scan_fn(**kw, return_last_state=True)
    first = {k: v[..., :20] if k in ("u", "delta", "z", "B", "C") else v for k, v in kw.items()}
    y_pre, state = selective_scan_fn(**first, return_last_state=True)
    ys = [y_pre]
    for t in range(20, 30):
        state, y_t = selective_state_update(state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t],
                                            kw["C"][..., t], D=kw["D"], z=kw["z"][..., t],
                                            delta_bias=kw["delta_bias"], delta_softplus=True)
        ys.append(y_t[..., None])
    assert rel_err(torch.cat(ys, -1), y_all) < 1e-6 and rel_err(state, h_all) < 1e-6


# ---- 4. dtypes and autocast -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCANS)
def test_float64_stays_float64(name):
    kw = make_inputs(2, 3, 4, 500, True, False, dtype=torch.float64, seed=13)
    y, h = SCANS[name](**kw, return_last_state=True)
    assert y.dtype == h.dtype == torch.float64
    y_true, h_true = truth(**kw)
    assert rel_err(y, y_true) < 1e-12 and rel_err(h, h_true) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", SCANS)
def test_half_inputs_computed_in_float32(name, dtype):
    kw = make_inputs(2, 3, 4, 300, True, True, dtype=dtype, seed=17)
    y, h = SCANS[name](**kw, return_last_state=True)
    assert y.dtype == dtype and h.dtype == torch.float32
    as32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    y32, h32 = SCANS[name](**as32, return_last_state=True)
    assert torch.equal(y, y32.to(dtype)) and torch.equal(h, h32)
    # and the float32 computation is accurate: the half result only loses the final rounding
    y_true, _ = truth(**as32)
    assert rel_err(y32, y_true) < 1e-5


def test_state_update_half_inputs():
    kw = make_inputs(2, 3, 4, 1, True, True, dtype=torch.bfloat16, seed=19)
    state = torch.randn(2, 3, 4)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    new_state, y = selective_state_update(state, *args, D=kw["D"], z=kw["z"][..., 0])
    assert new_state.dtype == torch.float32 and y.dtype == torch.bfloat16
    s32, y32 = selective_state_update(state, *(a.float() for a in args), D=kw["D"].float(), z=kw["z"][..., 0].float())
    assert torch.equal(new_state, s32) and torch.equal(y, y32.to(torch.bfloat16))
    # the new state keeps the state's dtype, whatever the inputs' (here a bfloat16 cache, float32 inputs)
    s16, _ = selective_state_update(state.bfloat16(), *(a.float() for a in args))
    s32, _ = selective_state_update(state.bfloat16().float(), *(a.float() for a in args))
    assert s16.dtype == torch.bfloat16 and torch.equal(s16, s32.bfloat16())


@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_bfloat16(backward_inside):
    """Under CPU autocast the fast scan (which uses matmul) still computes, and differentiates, in float32."""
    kw = make_inputs(2, 3, 4, 300, True, False, seed=23)
    gy = torch.randn((2, 3, 300), generator=torch.Generator().manual_seed(0))
    leaves = {k: v.clone().requires_grad_() for k, v in tensors(kw).items()}
    y32 = selective_scan_fn(**(kw | leaves))
    g32 = torch.autograd.grad((y32 * gy).sum(), list(leaves.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_fn(**(kw | leaves))
        if backward_inside:
            g = torch.autograd.grad((y * gy).sum(), list(leaves.values()))
    if not backward_inside:
        g = torch.autograd.grad((y * gy).sum(), list(leaves.values()))
    assert y.dtype == torch.float32
    assert rel_err(y, y32) < 1e-6
    for k, a, b in zip(leaves, g, g32):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-6, k


# ---- 5. the reference by hand -----------------------------------------------------------------------------

def test_reference_by_hand():
    """d = n = 1, l = 2, selective B, C. Step by step:
        Δ = (0.5, 1), A = -2, u = (1, 2), B = (3, -1), C = (4, 0.5), D = 0.5
        h1 = exp(-1) * 0 + 0.5 * 3 * 1             = 1.5
        y1 = 4 * 1.5 + 0.5 * 1                     = 6.5
        h2 = exp(-2) * 1.5 + 1 * (-1) * 2          = 1.5 e^-2 - 2
        y2 = 0.5 * (1.5 e^-2 - 2) + 0.5 * 2        = 0.75 e^-2
    and with the gate z = (2, -1): y * z * sigmoid(z).
    """
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 1.0]]], dtype=torch.float64)
    A = torch.tensor([[-2.0]], dtype=torch.float64)
    B = torch.tensor([[[3.0, -1.0]]], dtype=torch.float64)
    C = torch.tensor([[[4.0, 0.5]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    z = torch.tensor([[[2.0, -1.0]]], dtype=torch.float64)
    h2 = 1.5 * math.exp(-2) - 2
    for scan in SCANS.values():
        y, h = scan(u, delta, A, B, C, D=D, return_last_state=True)
        assert y.flatten().tolist() == pytest.approx([6.5, 0.75 * math.exp(-2)], rel=1e-14)
        assert h.item() == pytest.approx(h2, rel=1e-14)
        y = scan(u, delta, A, B, C, D=D, z=z)
        silu = [2 / (1 + math.exp(-2)), -1 / (1 + math.exp(1))]
        assert y.flatten().tolist() == pytest.approx([6.5 * silu[0], 0.75 * math.exp(-2) * silu[1]], rel=1e-14)


def test_reference_by_hand_softplus_time_invariant():
    """Δ = softplus(0 + 0) = log 2 at both steps, A = -1, B = 3, C = 2 (fixed), u = (1, 1), no D:
        h1 = log2 * 3                 y1 = 6 log2
        h2 = e^-log2 h1 + 3 log2      = 1.5 log2 + 3 log2 = 4.5 log2,   y2 = 9 log2
    """
    u = torch.ones(1, 1, 2, dtype=torch.float64)
    delta = torch.zeros(1, 1, 2, dtype=torch.float64)
    A, B, C = (torch.tensor([[v]], dtype=torch.float64) for v in (-1.0, 3.0, 2.0))
    for scan in SCANS.values():
        y, h = scan(u, delta, A, B, C, delta_bias=torch.zeros(1, dtype=torch.float64), delta_softplus=True,
                    return_last_state=True)
        assert y.flatten().tolist() == pytest.approx([6 * math.log(2), 9 * math.log(2)], rel=1e-14)
        assert h.item() == pytest.approx(4.5 * math.log(2), rel=1e-14)


def test_truth_helper_by_hand():
    """The test's own truth on the first hand case, so that it too is checked independently."""
    y, h = truth(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.5, 1.0]]]), torch.tensor([[-2.0]]),
                 torch.tensor([[[3.0, -1.0]]]), torch.tensor([[[4.0, 0.5]]]), D=torch.tensor([0.5]))
    assert y.flatten().tolist() == pytest.approx([6.5, 0.75 * math.exp(-2)], rel=1e-7)
    assert h.item() == pytest.approx(1.5 * math.exp(-2) - 2, rel=1e-7)

