"""Gradients of selective_scan.py's fast path: against the reference's (autograd through the sequential loop)
for every input, layout and option, at degenerate sizes, with one upstream gradient or the other, with the GPU's
chunking and a single chunk forced on small inputs, and against finite differences (gradcheck). Inputs and
helpers: scan_truth.py.
CPU, one thread, well under a minute.
"""
import pytest
import torch

from scan_truth import LAYOUT_IDS, LAYOUTS, check_against_truth, grads_of, make_inputs, rel_err, tensors
from selective_scan import selective_scan_fn, selective_scan_ref


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [1, 5, 64, 300, 1000])
def test_gradients_match_reference(l, layout, dtype, tol):
    kw = make_inputs(2, 3, 4, l, *layout, dtype=dtype, seed=100 + l)
    g = torch.Generator().manual_seed(l)
    # torch.randn(shape), never randn_like: y may be a transposed view and randn_like follows strides
    gy = torch.randn((2, 3, l), generator=g, dtype=dtype)
    gh = torch.randn((2, 3, 4), generator=g, dtype=dtype)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    assert set(g_fn) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    for k in g_ref:
        assert g_fn[k].shape == kw[k].shape and g_fn[k].dtype == dtype
        assert rel_err(g_fn[k], g_ref[k]) < tol, (k, rel_err(g_fn[k], g_ref[k]))


def fn_matches_truth_and_reference(l, layout, seed):
    """(b, d, n) = (2, 3, 4), float64: selective_scan_fn's forward against the truth, its gradients against
    the reference's."""
    kw = make_inputs(2, 3, 4, l, *layout, dtype=torch.float64, seed=seed)
    check_against_truth(kw, 1e-10, scans=("fn",))
    gy = torch.randn((2, 3, l), generator=torch.Generator().manual_seed(l), dtype=torch.float64)
    gh = torch.randn((2, 3, 4), generator=torch.Generator().manual_seed(l + 1), dtype=torch.float64)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    for k in g_ref:
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, (k, rel_err(g_fn[k], g_ref[k]))


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("l", [1, 2, 100, 1000])
def test_gpu_chunk_rule_on_cpu(l, layout, monkeypatch):
    """On CUDA the chunks are short and many (here T = 4: 250 chunks at l = 1000, whose chain takes 8
    rounds of the log-depth scan); CI has no GPU, so the CPU runs that chunking here: forward
    against the truth, gradients against the reference."""
    import selective_scan
    gpu_rule = selective_scan._chunk_len
    assert [gpu_rule(l_, 2 * 3 * 4, True) for l_ in (1, 2, 100, 1000)] == [1, 2, 4, 4]
    assert [gpu_rule(l_, 8 * 16 * 1536, True) for l_ in (256, 1024, 4096)] == [7, 14, 16]
    monkeypatch.setattr(selective_scan, "_chunk_len", lambda l_, slab, on_gpu: gpu_rule(l_, slab, True))
    fn_matches_truth_and_reference(l, layout, seed=200 + l)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("l", [1, 100, 1000])
def test_single_chunk_on_cpu(l, layout, monkeypatch):
    """From 2^17 elements a step (8 x 16 x 1536, say), and from 2^16 on up to 512 steps, the CPU scans in one
    chunk, level one skipped; these inputs are small, so the rule is checked, then forced."""
    import selective_scan
    rule = selective_scan._chunk_len
    slabs = (8 * 16 * 1536, 2 ** 17 + 1, 8 * 16 * 512, 2 ** 15)
    assert [rule(256, slab, False) for slab in slabs] == [256, 256, 256, 32]
    assert [rule(l_, 8 * 16 * 512, False) for l_ in (512, 513, 4096)] == [512, 129, 1024]
    monkeypatch.setattr(selective_scan, "_chunk_len", lambda l_, slab, on_gpu: l_)
    fn_matches_truth_and_reference(l, layout, seed=400 + l)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]], ids=LAYOUT_IDS[:2])
@pytest.mark.parametrize("l", [100, 1000])
def test_decays_recomputed_with_several_chunks(l, layout, monkeypatch):
    """Large inputs on CPU recompute exp(Δ A) in every pass instead of keeping it (KEPT_DECAYS_BYTES); the
    inputs of this test are small, so the limit is lowered to make them take that path (10 and 31 chunks)."""
    import selective_scan
    made, recomputed = [], selective_scan._RecomputedDecays
    monkeypatch.setattr(selective_scan, "KEPT_DECAYS_BYTES", 0)
    monkeypatch.setattr(selective_scan, "_RecomputedDecays", lambda *a: made.append(a) or recomputed(*a))
    fn_matches_truth_and_reference(l, layout, seed=300 + l)
    # forward and backward, several chunks: each step's slab is (b nc, 1, d) with b = 2
    assert made and all(steps[0].shape[0] > 2 for steps, _ in made)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("b,d,n", [(2, 1, 4), (1, 1, 1), (1, 3, 1)])
def test_gradients_degenerate_sizes(b, d, n, layout):
    """One channel or one state entry: shapes where a fixed (d, n) slab and a selective one coincide."""
    kw = make_inputs(b, d, n, 37, *layout, dtype=torch.float64, seed=7)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn((b, d, 37), generator=g, dtype=torch.float64)
    gh = torch.randn((b, d, n), generator=g, dtype=torch.float64)
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    for k in g_ref:
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, (k, rel_err(g_fn[k], g_ref[k]))


@pytest.mark.parametrize("upstream", ["y-only", "state-only"])
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]], ids=LAYOUT_IDS[:2])
def test_gradients_one_upstream(upstream, layout):
    """Only y, or only the last state, reaches the loss (the other gradient arrives as None / zeros)."""
    kw = make_inputs(2, 3, 4, 77, *layout, dtype=torch.float64, seed=9)
    g = torch.Generator().manual_seed(0)
    gy = torch.randn((2, 3, 77), generator=g, dtype=torch.float64) if upstream == "y-only" else None
    gh = torch.randn((2, 3, 4), generator=g, dtype=torch.float64) if upstream == "state-only" else None
    if upstream == "state-only":    # D and z do not reach the state: leave them out
        kw["D"] = kw["z"] = None
    g_fn, g_ref = grads_of(selective_scan_fn, kw, gy, gh), grads_of(selective_scan_ref, kw, gy, gh)
    for k in g_ref:
        assert rel_err(g_fn[k], g_ref[k]) < 1e-10, k


def test_gradients_without_last_state():
    """The usual training call: return_last_state=False, loss on y only."""
    kw = make_inputs(2, 3, 4, 200, True, True, dtype=torch.float64, seed=4)
    results = []
    for scan in (selective_scan_fn, selective_scan_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in tensors(kw).items()}
        y = scan(**(kw | leaves))
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        results.append(torch.autograd.grad((y * gy).sum(), list(leaves.values())))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("l", [1, 7])   # l = 7: two chunks of four steps, one of them padding
def test_gradcheck(l, layout):
    kw = make_inputs(2, 3, 2, l, *layout, dtype=torch.float64, seed=l)
    names = list(tensors(kw))

    def f(*xs):
        return selective_scan_fn(**dict(zip(names, xs)), delta_softplus=True, return_last_state=True)

    inputs = tuple(kw[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


