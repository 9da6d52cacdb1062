"""The selective scan: the recurrence at the heart of Mamba (paper section 3.2, Algorithm 2).

For every channel d and state index n, with the input u_t, step size Δ_t and the
input-dependent B_t, C_t (shapes in einops notation; b batch, d channels, n state size, l length):

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t          h: (b, d, n)     (state update)
    y_t = <C_t, h_t> + D u_t                        y: (b, d, l)     (readout)
    y_t = y_t * silu(z_t)                           when a gate z is given

Discretisation. The continuous system h'(t) = A h(t) + B u(t) is sampled with step Δ.
A is discretised exactly (zero-order hold): Abar = exp(Δ A), so a negative A always gives a
decay factor in (0, 1] and the state can never blow up, however large Δ gets. B uses the
simpler Euler rule Bbar = Δ B instead of ZOH's (Δ A)^-1 (exp(Δ A) - 1) B: the two agree up to
first order in Δ A, Euler needs no division by A (no special case as A -> 0), and it is what
the official kernels compute, so checkpoints trained with them behave the same here.

Three entry points, all with the official `mamba_ssm` signatures:
    selective_scan_ref      the plain sequential loop: the readable definition.
    selective_scan_fn       the fast path used for training and prompts (same results).
    selective_state_update  one timestep, for constant-time-per-token generation.

How the fast path works, and why this algorithm (measured by `python bench/bench_scan.py`, which
compares it with the loop and with a parallel scan; the figures are in docs/performance.md).
The recurrence is cheap per element but has l sequential steps, and eager PyTorch pays microseconds
per operation: a loop over l (the reference) is slow when b*d is small, and autograd through it stores
several (b, d, n) tensors per step. A log-depth parallel scan (Blelloch as in mambapy's pscan) makes
log2(l) strided passes each way over (b, d, n, l) tensors padded to a power of two, and keeps many
full-size copies for backward: on CPU, slower than the loop. Instead, a two-level chunked scan cuts the
sequence into nc chunks of T steps:
  1. every chunk is scanned from a zero state, all chunks at once (a loop of T steps over
     ((b nc), n, d) slabs), to find where each chunk's state would end;
  2. the chunks' ends are chained, start_{c+1} = exp(A ΣΔ_c) start_c + end_c, by a log-depth
     (Hillis-Steele) scan over the nc chunks;
  3. every chunk is scanned again from its true starting state, emitting y_t.
On CPU there are chunks only when b*d is small, enough that a step's slab is about 1 MiB (at most
sqrt(l)); larger b*d (b*n*d above 2^17 elements a step, or from 2^16 on a sequence of at most 512 steps)
gets nc = 1, a plain scan, and level 1 is skipped. On a GPU every operation costs a launch whatever its
size, so the chunks are short (T = 4 to 16) and the chain few launches (_chunk_len).
Only multiplications by exp(Δ A) <= 1 appear, as in the sequential loop, so nothing overflows for any
Δ >= 0 and A < 0 (unlike closed forms that divide by cumulative products or take a cumsum of exp).
Backward is a custom autograd function, with the same two levels run backwards in time for the
adjoint λ_t = C_t g_t + exp(Δ_{t+1} A) λ_{t+1}, and every gradient read off λ_t and h_t.
The states h_t are kept for backward, one (b, d, n, l) float32 tensor's worth (exp(Δ A) too when it is
cheaper to keep than to recompute: _decays), fewer than the loop's autograd keeps, so memory grows
linearly in l and stays below the loop's (tests/test_selective_scan_memory.py checks both). Without
gradients no states are kept. They are held as one slab per step rather than one big tensor, which the
allocator reuses from call to call instead of mapping and zeroing fresh pages.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, A_scale=None, initial_state=None):
    """Cast to the compute dtype (float32, float64 stays float64) and make Δ = softplus(Δ + bias);
    check that an initial state is one, (b, d, n)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    if initial_state is not None:
        expected = (u.shape[0], u.shape[1], A.shape[1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be (b, d, n) = {expected}, the state these inputs update; "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.to(dtype)
    return u, delta, A, B, C, None if A_scale is None else A_scale.to(dtype), initial_state


def _groups(B, C, d):
    """G, the number of channel groups of B and C given as (b, G, n, l), as mamba_ssm's ref takes them
    (G groups of d / G channels, each group with its own B_t, C_t); 1 when neither is grouped."""
    G = {M.shape[1] for M in (B, C) if M.dim() == 4} or {1}
    if len(G) > 1 or d % max(G):
        raise ValueError(f"B and C of shape (b, G, n, l) need one G that divides d = {d}; got G = {sorted(G)}")
    return G.pop()


def _finish(y, u, D, z, out_dtype):
    """y + D u (the skip connection), gated by silu(z), cast back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[..., None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, A_scale=None, initial_state=None):
    """The sequential definition: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <C_t, h_t> + D u_t.

    u, delta, z: (b, d, l); A: (d, n), negative; B, C: (d, n) (time-invariant, S4-like), (b, n, l)
    (selective) or (b, G, n, l) (selective per group of d / G channels); D, delta_bias: (d,).
    Returns y (b, d, l) in u's dtype, and with return_last_state also h_l (b, d, n) in the compute
    dtype. Not in the official signature:
    initial_state: None (zeros), or h_0 (b, d, n), the state before the first step, so that a
    sequence can be scanned in pieces, each from the last state of the one before.
    A_scale: None, or a positive (b, d, l) factor that makes A input-dependent, A_t = A_scale_t A,
    so the decay is exp(Δ_t A_t) while the input term stays Δ_t B_t u_t (the "selective A" of the
    paper's section 3.5.2; see model.py).
    """
    out_dtype = u.dtype
    u, delta, A, B, C, A_scale, h = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, A_scale,
                                             initial_state)
    b, d, l = u.shape
    G = _groups(B, C, d)
    B, C = (repeat(M, "b g n l -> b (g c) n l", c=d // G) if M.dim() == 4 else M for M in (B, C))
    # unbind gives every step a view whose gradients autograd gathers in one stack; indexing
    # x[:, :, t] instead would allocate a full-size gradient per step (quadratic backward).
    decay_step = delta if A_scale is None else delta * A_scale    # the Δ_t in exp(Δ_t A)
    def per_step(M):                                     # -> l times (d, n), (b, 1, n) or (b, d, n)
        return [M] * l if M.dim() == 2 else (M[:, None] if M.dim() == 3 else M).unbind(-1)
    steps = zip(decay_step.unbind(-1), (delta * u).unbind(-1), per_step(B), per_step(C))
    h = u.new_zeros(b, d, A.shape[1]) if h is None else h
    ys = []
    for step_t, x_t, B_t, C_t in steps:                  # x_t = Δ_t u_t, Euler's input term
        h = torch.exp(step_t[..., None] * A) * h + x_t[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = _finish(torch.stack(ys, dim=-1), u, D, z, out_dtype)
    return (y, h) if return_last_state else y


def to_dtype(t, dtype):
    """t in dtype; without the dispatch a no-op .to() costs, which one decoding step would pay dozens of times."""
    return t if t.dtype == dtype else t.to(dtype)


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, A_scale=None):
    """One step of the recurrence, for generation: exactly one iteration of selective_scan_ref.

    state: (b, d, n); u, delta, z and A_scale: (b, d); B, C: (b, n) as in the official kernel, or
    (1, d, n) for a time-invariant (d, n) matrix. Returns (new state (b, d, n) in state's dtype,
    y (b, d) in u's dtype). Written with as few operations as the recurrence allows (each one costs
    microseconds of overhead on a tensor this small, and a token goes through one per layer):
        h = exp(Δ A) h + (Δ u) B,    y = C h + D u,    y *= silu(z)
    """
    out_dtype = u.dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32

    def cast(t):
        return to_dtype(t, dtype)
    u, delta, A, B, C = cast(u), cast(delta), cast(A), cast(B), cast(C)
    if delta_bias is not None:
        delta = delta + cast(delta_bias)
    if delta_softplus:
        delta = F.softplus(delta)
    decay_step = delta if A_scale is None else delta * cast(A_scale)
    decay = torch.exp(decay_step[..., None] * A)                                   # exp(Δ A), (b, d, n)
    if B.dim() == 2:  # h = exp(Δ A) h + (Δ u) B^T: the input term is an outer product (b, d, 1) x (b, 1, n)
        h = torch.baddbmm(decay * cast(state), (delta * u)[..., None], B[:, None, :])
    else:
        h = torch.addcmul(decay * cast(state), (delta * u)[..., None], B)
    y = torch.bmm(h, C[:, :, None])[..., 0] if C.dim() == 2 else (h * C).sum(-1)    # C_t h_t
    if D is not None:
        y = torch.addcmul(y, u, cast(D))
    if z is not None:
        y = y * F.silu(cast(z))
    return to_dtype(h, state.dtype), to_dtype(y, out_dtype)


# ----------------------------------------------------------------------------- the fast path
# Inside the fast path a state slab is laid out ((b nc), n, d): channels innermost, so the sums over n and over
# d run over contiguous memory, as batched products over b nc. Per-step operands are views made once (unbind).

def _chunk_len(l, slab, on_gpu):
    """Steps per chunk T, given slab = b*n*d elements per chunk and step.

    On CPU each of a step's operations costs a fixed overhead plus its arithmetic: enough chunks that a
    step works on ~2^18 elements (1 MiB), at most sqrt(l) of them to keep the chain small. Above 2^17
    elements a step that leaves one chunk, and level one is skipped. From 2^16 elements a step on
    sequences of at most 512 steps (the training lengths) one chunk too: there the scan without level one's
    passes ran faster on the Intel CPUs measured and level on the AMD one, which preferred chunks at longer l
    (`python bench/bench_scan.py`; figures in docs/performance.md; `--methods fast,fast@1,fast@4` there
    times the rule beside one and four chunks on another machine).
    On a GPU a step of a chunk launches about 16 kernels forward plus backward, whatever its size, and
    the chain passes over memory about 11 log2(nc) / T times the (b, d, n, l) size: short chunks win on
    small problems, long ones on large. Timed over T = 4, 8, 16, the best T follows sqrt(b d n l) / 1024,
    used within 4..16 (`python bench/bench_scan.py --device cuda`; figures in docs/performance.md).
    """
    if on_gpu:
        return min(l, max(4, min(16, round(math.sqrt(slab * l) / 1024))))
    if slab >= 2 ** 16 and l <= 512:
        return l
    nc = max(1, min(2 ** 18 // slab, math.isqrt(l)))
    return -(-l // nc)


def _to_chunks(x, T):
    """(b, k, l) -> (T, b nc, k), zero-padded to nc*T steps: step t of every chunk is one slab. With one chunk
    a view, no copy: a step's slab (b, k) is then strided over b, which the per-step operations read as fast.

    Padded steps have Δ = 0 and u = 0, so exp(Δ A) = 1 and no input: the state passes through
    unchanged and the final state is still h_l. Works through the (b, l, k) view, so that a
    (b, k, l) tensor which is a transposed view of a contiguous (b, l, k) one (as the model
    passes u, Δ, B and C) is copied by whole rows rather than element by element.
    """
    l = x.shape[-1]
    nc = -(-l // T)
    x = rearrange(x, "b k l -> b l k")
    if nc * T > l:
        x = F.pad(x, (0, 0, 0, nc * T - l))                             # the copy by rows: (b, nc T, k)
    else:  # a (b, k, l) input is transposed first, which runs faster than permuting it straight into chunks;
        x = x.contiguous()  # a time-major view has nothing to pad and nothing to transpose: no copy here
    x = rearrange(x, "b (nc T) k -> T (b nc) k", T=T)
    return x if nc == 1 else x.contiguous()


def _from_chunks(x, b, l):
    """(T, b nc, k) -> (b, k, l), the inverse of _to_chunks: a transposed view of a (b, l, k) tensor."""
    x = rearrange(x, "T (b nc) k -> b (nc T) k", b=b)     # a copy unless nc or T is 1
    return rearrange(x[:, :l], "b l k -> b k l")


def _chunk_inputs(u, delta, B, C, T):
    """u, Δ as (T, b nc, 1, d) slabs; B and C selective (b, n, l) -> (T, b nc, n), fixed (d, n) -> (1, n, d)."""
    def chunked(M):
        return _to_chunks(M, T) if M.dim() == 3 else rearrange(M, "d n -> 1 n d").contiguous()
    return _to_chunks(u, T)[:, :, None], _to_chunks(delta, T)[:, :, None], chunked(B), chunked(C)


def _per_step(M, T, selective, column):
    """Step t's slab of B or C for every t: a selective M (T, b nc, n) gives columns (b nc, n, 1), which
    broadcast against the state, or rows (b nc, 1, n), for the products over n; a fixed M (1, n, d) is
    the same slab at every step, either way."""
    if not selective:
        return [M] * T
    return (M[..., None] if column else M[:, :, None]).unbind(0)


def _sum_n(M, S, out, selective):
    """out = Σ_n M S, (b nc, 1, d): S (b nc, n, d); M a row (b nc, 1, n) selective or (1, n, d) fixed.
    (The layout is passed, not read off M's shape: with d = 1 the two shapes can coincide.)"""
    if selective:
        torch.bmm(M, S, out=out)
    else:
        torch.sum(M * S, -2, keepdim=True, out=out)


def _sum_d(S, v, out, selective):
    """out = Σ_d S v, like B's or C's slab: a row (b nc, 1, n) selective (v S^T runs faster than S v^T), or
    (1, n, d) fixed, summed over b nc (every chunk shares the matrix); S (b nc, n, d), v a row (b nc, 1, d)."""
    if selective:
        torch.bmm(v, S.transpose(1, 2), out=out)
    else:
        torch.sum(S * v, 0, keepdim=True, out=out)


def _chain(local, decay, carry, reverse=False):
    """Level two of the scan: what enters chunk c+1 = decay_c * (what entered chunk c) + local_c.

    local, decay: (b, nc, n, d), local being each chunk's result from a zero start (both overwritten);
    carry: (b, n, d) entering the first chunk visited, or None for zeros; reverse: visit the chunks last
    to first (the adjoint runs backwards in time). Returns what enters every chunk, (b, nc, n, d).
    A Hillis-Steele scan over the chunk axis: in round k every chunk takes in the partial result of the
    chunk k before it, so log2(nc) whole-tensor rounds replace a loop of nc small ones (on a GPU each
    operation costs a launch). The decays multiplied are products of exp(Δ A) <= 1: nothing overflows.
    """
    nc = local.shape[1]
    if reverse:
        first, later, earlier = -1, slice(None, -1), slice(1, None)
    else:
        first, later, earlier = 0, slice(1, None), slice(None, -1)
    if carry is not None:
        local[:, first].addcmul_(decay[:, first], carry)
    k = 1
    while k < nc:                          # round k: chunk c takes in chunk c - k's (c + k's in reverse)
        dst, src = (slice(None, -k), slice(k, None)) if reverse else (slice(k, None), slice(None, -k))
        local[:, dst].add_(decay[:, dst] * local[:, src])  # the product is computed before the add
        if 2 * k < nc:
            decay[:, dst] = decay[:, dst] * decay[:, src]
        k *= 2
    entering = torch.empty_like(local)     # local now holds what leaves each chunk: shift by one
    entering[:, first] = 0 if carry is None else carry
    entering[:, later] = local[:, earlier]
    return entering


def _log2_rate(A):
    """A (d, n) -> (n, d) times log2(e), so that exp(Δ A) = exp2(Δ A log2(e)): PyTorch's exp2 ran faster
    than its exp on the CPU of docs/performance.md's scan tables, for one more rounding, the size Δ A has."""
    return (rearrange(A, "d n -> n d") * math.log2(math.e)).contiguous()


KEPT_DECAYS_BYTES = 2 ** 23  # on CPU exp(Δ A) of every step is kept when it all fits in 8 MiB (a cache)


def _decays(steps, A2, several_chunks):
    """exp(Δ_t A) = exp2(step_t A2) for every step t, (b nc, n, d) each; steps: T slabs (b nc, 1, d).

    With several chunks two forward passes and backward read each one: kept (a slab per step, which the
    allocator reuses) on a GPU, or on CPU when all fit in a cache (KEPT_DECAYS_BYTES). Otherwise each is
    recomputed into one scratch slab, in cache, faster than writing them all to memory and reading them
    back, and without the full-size copy (`python bench/bench_scan.py`; figures in docs/performance.md).
    """
    fits = len(steps) * steps[0].numel() * A2.shape[0] * A2.element_size() <= KEPT_DECAYS_BYTES
    if several_chunks and (fits or A2.device.type != "cpu"):
        return [torch.mul(s, A2).exp2_() for s in steps]
    return _RecomputedDecays(steps, A2)


class _RecomputedDecays:
    """decays[t] computes exp2(step_t A2) into the same scratch slab at every access: valid until
    the next access, which is all that a pass needs (it reads each step's decay once, in order)."""

    def __init__(self, steps, A2):
        self.steps, self.A2 = steps, A2
        self.slab = torch.empty(steps[0].shape[:1] + A2.shape, dtype=A2.dtype, device=A2.device)

    def __getitem__(self, t):
        return torch.mul(self.steps[t], self.A2, out=self.slab).exp2_()


class _SelectiveScan(torch.autograd.Function):
    """y = <C_t, h_t> with h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, by the two-level chunked scan.

    Inputs already in the compute dtype, Δ already through softplus: u, delta (b, d, l);
    A (d, n); B, C (b, n, l) or (d, n); A_scale (b, d, l) or None; h0 (b, d, n) or None (zeros).
    Outputs y (b, d, l) and the last state (b, d, n).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, A_scale, h0, keep):
        b, d, l = u.shape
        n = A.shape[1]
        T = _chunk_len(l, b * n * d, u.device.type != "cpu")
        u, dt, Bs, Cs = _chunk_inputs(u, delta, B, C, T)    # u, dt: (T, b nc, 1, d)
        scale = None if A_scale is None else _to_chunks(A_scale, T)[:, :, None]
        step = dt if scale is None else dt * scale  # the step in exp(Δ_t A_scale_t A)
        x = dt * u                                  # Euler's Δ_t u_t
        nc = dt.shape[1] // b
        A2 = _log2_rate(A)
        dA = _decays(step.unbind(0), A2, nc > 1)
        sel_B, sel_C = B.dim() == 3, C.dim() == 3
        xs, B_cols, C_rows = x.unbind(0), _per_step(Bs, T, sel_B, True), _per_step(Cs, T, sel_C, False)

        first = None if h0 is None else rearrange(h0, "b d n -> b n d")     # what enters chunk 0
        if nc == 1:
            starts = u.new_zeros(b, n, d) if first is None else first.contiguous()
        else:
            h = u.new_zeros(b * nc, n, d)           # 1. each chunk from a zero state
            for t in range(T):
                h.mul_(dA[t]).addcmul_(xs[t], B_cols[t])
            decay = torch.exp2(step.sum(0) * A2)    # exp(A ΣΔ): the product of a chunk's exp(Δ_t A)
            starts = _chain(h.view(b, nc, n, d), decay.view(b, nc, n, d), first).view(b * nc, n, d)  # 2.

        # 3. scan every chunk from its true start, emitting y. For backward keep every state (one slab
        # per step, as the decays): recomputing them there would cost a pass as long as this one.
        H = []
        h = starts if keep else starts.clone()
        y = u.new_empty(T, b * nc, 1, d)
        for t, y_t in enumerate(y.unbind(0)):
            h = torch.mul(h, dA[t]) if keep else h.mul_(dA[t])
            _sum_n(C_rows[t], h.addcmul_(xs[t], B_cols[t]), y_t, sel_C)
            if keep:
                H.append(h)
        ctx.save_for_backward(u, dt, scale, A, Bs, Cs, starts, *H, *(dA if isinstance(dA, list) else []))
        ctx.b, ctx.selective = b, (sel_B, sel_C)
        return _from_chunks(y[:, :, 0], b, l), rearrange(h.view(b, nc, n, d)[:, -1], "b n d -> b d n").contiguous()

    @staticmethod
    def backward(ctx, gy, glast):
        u, dt, scale, A, Bs, Cs, starts, *slabs = ctx.saved_tensors
        (sel_B, sel_C), b = ctx.selective, ctx.b
        step = dt if scale is None else dt * scale
        T, bnc, _, d = u.shape
        nc, n, l = bnc // b, A.shape[1], gy.shape[-1]
        A2 = _log2_rate(A)
        x = dt * u
        g = _to_chunks(gy, T)[:, :, None]           # (T, b nc, 1, d)
        gs, xs, steps = g.unbind(0), x.unbind(0), step.unbind(0)
        H, dA = slabs[:T], (slabs[T:] or _decays(steps, A2, nc > 1))
        B_rows, C_cols = _per_step(Bs, T, sel_B, False), _per_step(Cs, T, sel_C, True)

        # The adjoint λ_t = dL/dh_t obeys the same recurrence backwards in time,
        # λ_t = C_t g_t + exp(Δ_{t+1} A) λ_{t+1}, so the same two levels compute it.
        last = None if glast is None else rearrange(glast, "b d n -> b n d")
        if nc == 1:
            ends = torch.zeros_like(starts) if last is None else last.clone(memory_format=torch.contiguous_format)
        else:
            lam = torch.zeros_like(starts)          # 1. each chunk from a zero adjoint
            for t in reversed(range(T)):
                lam.addcmul_(gs[t], C_cols[t]).mul_(dA[t])
            decay = torch.exp2(step.sum(0) * A2)    # 2. chain the chunks, right to left
            ends = _chain(lam.view(b, nc, n, d), decay.view(b, nc, n, d), last, reverse=True).view(bnc, n, d)
        lam, w = ends, torch.empty_like(starts)    # 3. scan each chunk back from its true end
        # dL/d(decay step), dL/d(Δ_t u_t), a contiguous slab per step (u may be a strided view): a batched
        # product writes into a strided out= through a copy, three times as slow
        g_step, g_x = u.new_empty(u.shape), u.new_empty(u.shape)
        g_B, g_C = ((u.new_empty(T, bnc, 1, n) if sel else u.new_empty(T, 1, n, d)) for sel in (sel_B, sel_C))
        g_A = torch.zeros_like(starts)
        At = rearrange(A, "d n -> n d").contiguous()   # w.mul_ by a strided view of A runs much slower
        ones = u.new_ones(bnc, 1, n)                # Σ_n as a batched product: faster than torch.sum over n
        g_steps, g_xs, g_Bs, g_Cs = (M.unbind(0) for M in (g_step, g_x, g_B, g_C))
        for t in reversed(range(T)):
            lam.addcmul_(gs[t], C_cols[t])          # λ_t
            _sum_n(B_rows[t], lam, g_xs[t], sel_B)  # dL/d(Δ_t u_t) = <λ_t, B_t>
            _sum_d(lam, xs[t], g_Bs[t], sel_B)
            _sum_d(H[t], gs[t], g_Cs[t], sel_C)
            lam.mul_(dA[t])                         # λ_t exp(Δ_t A): the adjoint flowing to t-1
            torch.mul(lam, H[t - 1] if t else starts, out=w)   # dL/d(Δ_t A), elementwise
            g_A.addcmul_(w, steps[t])
            torch.bmm(ones, w.mul_(At), out=g_steps[t])
        # Δ enters through the decay step (times A_scale when given) and through Δ_t u_t
        g_dt = (g_step if scale is None else g_step * scale).addcmul_(g_x, u)
        g_scale = None if scale is None else _from_chunks((g_step * dt)[:, :, 0], b, l)

        def unchunk(gS, selective):                 # a per-step slab gradient -> B's or C's shape
            return _from_chunks(gS[:, :, 0], b, l) if selective else gS.sum((0, 1)).t()
        # what flowed back past the first step is dL/dh_0: λ_0 exp(Δ_0 A), left in chunk 0's adjoint
        g_h0 = rearrange(lam.view(b, nc, n, d)[:, 0], "b n d -> b d n") if ctx.needs_input_grad[6] else None
        return (_from_chunks((g_x * dt)[:, :, 0], b, l), _from_chunks(g_dt[:, :, 0], b, l),
                g_A.sum(0).t(), unchunk(g_B, sel_B), unchunk(g_C, sel_C), g_scale, g_h0, None)


@torch.compiler.disable
def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, A_scale=None, initial_state=None):
    """The fast selective scan: same signature and results as selective_scan_ref.

    Pure PyTorch, differentiable (initial_state included), CPU or GPU, any length. Runs in float32
    (float64 stays float64) with autocast off, because exp(Δ A) products lose too much in bfloat16.
    Under torch.compile it runs eagerly: its Python loops would be unrolled into the graph (docs/training.md)."""
    G = _groups(B, C, u.shape[1])
    if G > 1:  # each group of d / G channels is a scan of its own, with its own B and C
        return _scan_by_group(G, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              A_scale, initial_state)
    B, C = (M[:, 0] if M.dim() == 4 else M for M in (B, C))  # one group: (b, 1, n, l) is (b, n, l)
    out_dtype = u.dtype
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta, A, B, C, A_scale, h0 = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, A_scale,
                                                  initial_state)
        # keep the states for backward only when there will be one
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (u, delta, A, B, C, A_scale, h0))
        y, last = _SelectiveScan.apply(u, delta, A, B, C, A_scale, h0, keep)
        y = _finish(y, u, D, z, out_dtype)
    return (y, last) if return_last_state else y


def _scan_by_group(G, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, A_scale,
                   initial_state):
    """selective_scan_fn over G channel groups, one call each: B and C (b, G, n, l) give group g its
    own (b, n, l); every per-channel input is cut along d; the outputs are put back together."""
    def part(x, g, along):                         # group g's share of x, cut along dimension `along`
        return None if x is None else x.chunk(G, dim=along)[g]

    def shared(M, g):                              # B or C for group g
        return M[:, g] if M.dim() == 4 else part(M, g, 0) if M.dim() == 2 else M
    outs = [selective_scan_fn(part(u, g, 1), part(delta, g, 1), part(A, g, 0), shared(B, g), shared(C, g),
                              part(D, g, 0), part(z, g, 1), part(delta_bias, g, 0), delta_softplus, True,
                              part(A_scale, g, 1), part(initial_state, g, 1)) for g in range(G)]
    y, last = (torch.cat(parts, dim=1) for parts in zip(*outs))
    return (y, last) if return_last_state else y
