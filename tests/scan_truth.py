"""The independent float64 truth and the helpers the scan tests share (selective scan; AllocatedBytes for ssd too).

truth is the recurrence as the paper writes it, one timestep at a time in float64, written without
selective_scan.py's code; the test files check selective_scan_ref and selective_scan_fn against it
(test_selective_scan.py checks truth itself on a case worked by hand). The helpers make the inputs,
compare results and take gradients: make_inputs, rel_err, tensors, check_against_truth, grads_of, and
the scans and B/C layouts the tests run over (SCANS, LAYOUTS, LAYOUT_IDS). Not a test file: pytest
collects nothing here, and the test files import it as `scan_truth` (tests/ is on sys.path under pytest).
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selective_scan import selective_scan_fn, selective_scan_ref

SCANS = {"ref": selective_scan_ref, "fn": selective_scan_fn}
LAYOUTS = [(False, False), (True, True), (True, False), (False, True)]  # (B selective, C selective)
LAYOUT_IDS = ["BC-fixed", "BC-sel", "B-sel-C-fixed", "B-fixed-C-sel"]


def truth(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, A_scale=None,
          initial_state=None):
    """The recurrence as written in the paper, in float64, one timestep at a time. Returns y (b, d, l), h_l.
    With A_scale (b, d, l), A is input-dependent: A_t = A_scale_t A in the decay exp(Δ_t A_t) only.
    initial_state (b, d, n): h_0, the state before the first step (zeros when None). B or C (b, G, n, l):
    channel c reads group c // (d / G)'s."""
    u, delta, A, B, C = (x.detach().double() for x in (u, delta, A, B, C))
    B, C = (M.repeat_interleave(u.shape[1] // M.shape[1], dim=1) if M.dim() == 4 else M for M in (B, C))
    A_scale = torch.ones_like(u) if A_scale is None else A_scale.detach().double()
    if delta_bias is not None:
        delta = delta + delta_bias.detach().double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    b, d, l = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64) if initial_state is None else initial_state.detach().double()
    y = torch.zeros(b, d, l, dtype=torch.float64)
    for t in range(l):
        # (d, n), (b, 1, n), or per channel (b, d, n)
        B_t, C_t = (M if M.dim() == 2 else M[:, None, :, t] if M.dim() == 3 else M[..., t] for M in (B, C))
        dt = delta[:, :, t, None]                               # (b, d, 1)
        A_t = A * A_scale[:, :, t, None]                         # (b, d, n)
        h = torch.exp(dt * A_t) * h + dt * B_t * u[:, :, t, None]
        y[:, :, t] = (C_t * h).sum(-1)
        if D is not None:
            y[:, :, t] += D.detach().double() * u[:, :, t]
    if z is not None:
        z = z.detach().double()
        y = y * z * torch.sigmoid(z)
    return y, h


def rel_err(x, ref):
    """Largest absolute difference, relative to the largest magnitude of the reference."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_inputs(b, d, n, l, B_sel, C_sel, D=True, z=True, bias=True, softplus=True, dtype=torch.float32,
                seed=0):
    """Random inputs in a realistic range: Δ about 0.05..1.5, A = -exp(N(0, 0.5^2))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if softplus:
        delta = rnd(b, d, l) * 0.5 - 0.5           # softplus(delta + bias) ~ 0.1..1.5
    else:
        delta = torch.rand(b, d, l, generator=g, dtype=torch.float64) + 0.05
    kw = dict(
        u=rnd(b, d, l),
        delta=delta,
        A=-torch.exp(rnd(d, n) * 0.5),
        B=rnd(b, n, l) if B_sel else rnd(d, n),
        C=rnd(b, n, l) if C_sel else rnd(d, n),
        D=rnd(d) if D else None,
        z=rnd(b, d, l) if z else None,
        # without softplus Δ + bias must stay >= 0 (A < 0 only bounds the state when Δ >= 0)
        delta_bias=(rnd(d) * 0.3 - 0.5 if softplus else torch.rand(d, generator=g, dtype=torch.float64) * 0.1)
        if bias else None,
    )
    kw = {k: None if v is None else v.to(dtype) for k, v in kw.items()}
    kw["delta_softplus"] = softplus
    return kw


def tensors(kw):
    """The tensor entries of make_inputs' kw: the inputs a gradient can be taken for."""
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}


def check_against_truth(kw, tol, scans=("ref", "fn")):
    """The scans named (keys of SCANS) on kw against truth: y and h_l within relative error tol, and finite."""
    y_true, h_true = truth(**kw)
    for name in scans:
        y, h = SCANS[name](**kw, return_last_state=True)
        assert y.shape == y_true.shape and h.shape == h_true.shape
        assert torch.isfinite(y).all() and torch.isfinite(h).all(), name
        assert rel_err(y, y_true) < tol, (name, rel_err(y, y_true))
        assert rel_err(h, h_true) < tol, (name, rel_err(h, h_true))
        # without return_last_state: y alone, the same values
        y_only = SCANS[name](**kw)
        assert isinstance(y_only, torch.Tensor)
        assert rel_err(y_only, y_true) < tol, name


def grads_of(scan, kw, gy, gh):
    """Gradients w.r.t. every tensor input, for upstream gradients gy on y and gh on the last state."""
    leaves = {k: v.clone().requires_grad_() for k, v in tensors(kw).items()}
    y, h = scan(**(kw | leaves), return_last_state=True)
    loss = 0
    if gy is not None:
        loss = loss + (y * gy).sum()
    if gh is not None:
        loss = loss + (h * gh).sum()
    # C (and D, z) do not reach the last state: a None gradient becomes zeros
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                                materialize_grads=True)))


class AllocatedBytes(TorchDispatchMode):
    """Sums the sizes of the tensors that ops return fresh (not views, not in-place, not out=)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, o in zip(func._schema.returns, outs):
            if isinstance(o, torch.Tensor) and ret.alias_info is None:
                self.total += o.untyped_storage().nbytes()
        return out
