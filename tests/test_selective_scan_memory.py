"""selective_scan_fn's memory grows linearly with the length l, and stays below the loop's.

Behavioural measures, not timings, so they hold on any machine.
"""
import math

import torch

from scan_truth import AllocatedBytes
from selective_scan import selective_scan_fn, selective_scan_ref

# ---- memory grows linearly with l --------------------------------------------------------------------------
#
# Two behavioural measures (no timing):
#   saved:     bytes of the distinct storages autograd keeps for backward (saved-tensor hooks);
#   allocated: bytes of every fresh tensor created while backward runs (a dispatch mode sees every op).
# Linear memory gives a ratio of ~4 between l = 2048 and l = 512; a quadratic term gives ~16. The
# controls below run two quadratic implementations through the same measures to show they would fail.

def memory_of(scan, l, b=1, d=8, n=4):
    """(saved bytes, bytes allocated by backward) for one forward + backward at length l."""
    g = torch.Generator().manual_seed(0)
    leaves = dict(u=torch.randn(b, d, l, generator=g), delta=torch.rand(b, d, l, generator=g),
                  A=-torch.rand(d, n, generator=g) - 0.5,
                  B=torch.randn(b, n, l, generator=g), C=torch.randn(b, n, l, generator=g))
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = scan(**leaves)
    gy = torch.randn(y.shape, generator=g)
    with AllocatedBytes() as mode:
        torch.autograd.grad((y * gy).sum(), list(leaves.values()))
    return sum(storages.values()), mode.total


def sliced_loop_scan(u, delta, A, B, C):
    """The pitfall of the issue: indexing x[:, :, t] makes backward allocate a full-size gradient per step."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def quadratic_scan(u, delta, A, B, C):
    """The closed form h_t = Σ_{s<=t} exp(A Σ_{s<r<=t} Δ_r) Δ_s B_s u_s: an (l, l) kernel, kept for backward."""
    l = u.shape[-1]
    cs = (delta[:, :, None, :] * A[:, :, None]).cumsum(-1)                 # (b, d, n, l)
    segment = cs[..., :, None] - cs[..., None, :]                          # (b, d, n, t, s)
    causal = torch.ones(l, l, dtype=torch.bool).tril()
    kernel = torch.exp(segment.masked_fill(~causal, -math.inf))
    x = (delta * u)[:, :, None, :] * B[:, None]                            # (b, d, n, l)
    h = (kernel * x[..., None, :]).sum(-1)
    return (h * C[:, None]).sum(2)


def test_quadratic_controls_are_scans():
    """The two controls compute the same scan as the reference (itself checked against a float64
    recurrence in test_selective_scan.py): they differ from the fast path only in memory."""
    g = torch.Generator().manual_seed(1)
    kw = dict(u=torch.randn(1, 8, 50, generator=g, dtype=torch.float64),
              delta=torch.rand(1, 8, 50, generator=g, dtype=torch.float64),
              A=-torch.rand(8, 4, generator=g, dtype=torch.float64) - 0.5,
              B=torch.randn(1, 4, 50, generator=g, dtype=torch.float64),
              C=torch.randn(1, 4, 50, generator=g, dtype=torch.float64))
    want = selective_scan_ref(**kw)
    for control in (sliced_loop_scan, quadratic_scan):
        assert (control(**kw) - want).abs().max() < 1e-10 * want.abs().max()


def test_memory_linear_in_length():
    saved_512, alloc_512 = memory_of(selective_scan_fn, 512)
    saved_2048, alloc_2048 = memory_of(selective_scan_fn, 2048)
    # at least the (b, d, n, l) float32 states, so the measure sees what matters
    assert saved_512 >= 512 * 8 * 4 * 4
    assert 3.5 <= saved_2048 / saved_512 <= 4.5, saved_2048 / saved_512
    assert 3.5 <= alloc_2048 / alloc_512 <= 4.5, alloc_2048 / alloc_512
    # and no more than the plain loop keeps (the reference slices with unbind: linear too)
    ref_512, _ = memory_of(selective_scan_ref, 512)
    ref_2048, _ = memory_of(selective_scan_ref, 2048)
    assert saved_512 <= ref_512 and saved_2048 <= ref_2048, (saved_512, ref_512, saved_2048, ref_2048)


def test_memory_measures_catch_quadratic():
    """The same measures, 4x the length: a quadratic implementation shows a ratio far above 4.5."""
    saved_64, _ = memory_of(quadratic_scan, 64)
    saved_256, _ = memory_of(quadratic_scan, 256)
    assert saved_256 / saved_64 > 10, saved_256 / saved_64
    _, alloc_128 = memory_of(sliced_loop_scan, 128)
    _, alloc_512 = memory_of(sliced_loop_scan, 512)
    assert alloc_512 / alloc_128 > 10, alloc_512 / alloc_128
