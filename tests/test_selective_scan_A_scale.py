"""selective_scan.py's optional A_scale: A made input-dependent, A_t = A_scale_t A in the decay only (the selective
A of the paper's section 3.5.2, model.py's selective_A). Checked like the rest of the scan, against the float64
recurrence of scan_truth.py (which takes A_scale), the reference's gradients and gradcheck."""
import pytest
import torch

from scan_truth import LAYOUT_IDS, LAYOUTS, SCANS, check_against_truth, grads_of, make_inputs, rel_err, tensors
from selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update


def with_A_scale(kw, seed, low=0.0, high=3.0):
    """kw plus a positive A_scale (b, d, l) uniform in (low, high]: decays from exp(0) = 1 to 3x the plain one."""
    g = torch.Generator().manual_seed(seed)
    scale = low + (high - low) * (1 - torch.rand(kw["u"].shape, generator=g, dtype=torch.float64))
    return kw | {"A_scale": scale.to(kw["u"].dtype)}


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("b,d,n,l", [(2, 3, 4, 1), (2, 3, 4, 127), (1, 512, 256, 64), (3, 5, 7, 1000)])
def test_A_scale_forward_matches_truth(b, d, n, l, layout):
    check_against_truth(with_A_scale(make_inputs(b, d, n, l, *layout, seed=l), seed=l), 1e-5)


def test_A_scale_extreme_values_stay_finite():
    """A_scale up to 1e3 on Δ up to 20 and A down to -100 (decay exp(-2e6) = 0) and down to 1e-30 (no decay)."""
    kw = make_inputs(2, 3, 4, 300, True, True, softplus=False, seed=5)
    kw["delta"] = kw["delta"] * 20
    kw["A"] = kw["A"] * 100 / kw["A"].abs().max()
    scale = torch.full_like(kw["u"], 1e3)
    scale[:, :, ::2] = 1e-30
    kw["A_scale"] = scale
    for name, scan in SCANS.items():
        y, h = scan(**kw, return_last_state=True)
        assert torch.isfinite(y).all() and torch.isfinite(h).all(), name
    check_against_truth(kw, 1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [1, 64, 300])
def test_A_scale_gradients_match_reference(l, layout):
    kw = with_A_scale(make_inputs(2, 3, 4, l, *layout, dtype=torch.float64, seed=200 + l), seed=l)
    g = torch.Generator().manual_seed(l)
    gy = torch.randn((2, 3, l), generator=g, dtype=torch.float64)
    gh = torch.randn((2, 3, 4), generator=g, dtype=torch.float64)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    assert "A_scale" in g_fn and g_fn["A_scale"].shape == kw["A_scale"].shape
    for k in g_ref:
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, (k, rel_err(g_fn[k], g_ref[k]))


@pytest.mark.parametrize("l", [1, 7])
def test_A_scale_gradcheck(l):
    kw = with_A_scale(make_inputs(2, 3, 2, l, True, True, dtype=torch.float64, seed=l), seed=l, low=0.5)
    names = list(tensors(kw))

    def f(*xs):
        return selective_scan_fn(**dict(zip(names, xs)), delta_softplus=True, return_last_state=True)

    inputs = tuple(kw[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_A_scale_state_update_reproduces_scan():
    kw = with_A_scale(make_inputs(2, 3, 4, 30, True, False, dtype=torch.float64, seed=8), seed=8)
    y_ref, h_ref = selective_scan_ref(**kw, return_last_state=True)
    state, ys = torch.zeros(2, 3, 4, dtype=torch.float64), []
    for t in range(30):
        state, y_t = selective_state_update(state, kw["u"][:, :, t], kw["delta"][:, :, t], kw["A"],
                                            kw["B"][:, :, t], kw["C"][None], D=kw["D"], z=kw["z"][:, :, t],
                                            delta_bias=kw["delta_bias"], delta_softplus=True,
                                            A_scale=kw["A_scale"][:, :, t])
        ys.append(y_t)
    assert rel_err(torch.stack(ys, -1), y_ref) < 1e-12 and rel_err(state, h_ref) < 1e-12
