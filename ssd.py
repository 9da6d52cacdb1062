"""The SSD scan of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060, section 6 and Listing 1).

Mamba-2 restricts A to a scalar per head, so that the selective SSM is, per head, a masked attention-like
matrix (state space duality) and can be computed with matrix products. Shapes (einops notation; the layout is
time-major, as the official mamba_ssm.ops.triton.ssd_combined):

    x: (b, l, h, p)   input, h heads of p channels          dt: (b, l, h)   step size Δ before bias/softplus
    A: (h,)           one negative scalar per head            B, C: (b, l, g, n)   g groups of h / g heads each
    D: (h,)           skip, optional                          state: (b, h, p, n)

    per head:  h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T        (state update)
               y_t = h_t C_t + D x_t                            (readout)

Three entry points, like selective_scan.py's:
    ssd_ref           the sequential definition, one loop over time: the readable truth.
    ssd_chunked       the chunked algorithm (Listing 1): the same numbers from matrix products.
    ssd_state_update  one step, for decoding.

The chunked algorithm cuts the sequence into chunks of T steps and, with a_t = Δ_t A (<= 0) and X_t = Δ_t x_t:
  1. within each chunk, the masked product y_t = Σ_{s<=t} (C_t · B_s) exp(a_{s+1} + ... + a_t) X_s: the
     attention-like "diagonal blocks", a (T, T) matrix per chunk and head;
  2. each chunk's final state from a zero start, Σ_s exp(a_{s+1} + ... + a_T) X_s B_s^T;
  3. the chain between chunks: what enters chunk k+1 = exp(a summed over chunk k) (what entered k) + (2.);
  4. what entered each chunk, read out at its every step: C_t · exp(a_1 + ... + a_t) h_enter.
The segment sums a_{s+1} + ... + a_t are summed entry by entry (``_segsum``), never taken as the difference
of two cumulative sums, which loses precision when the sums are large and, above the diagonal, is positive
and can overflow exp. Memory is linear in l: (T, T) per chunk, and the chain (3.) is a loop over chunks.
"""
import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_states):
    """The compute dtype (float32, float64 stays float64), Δ = softplus(dt + dt_bias), shapes checked."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    if h % B.shape[2] or B.shape[2] != C.shape[2]:
        raise ValueError(f"B and C (b, l, g, n) need one number of groups g that divides the h = {h} heads; "
                         f"got {B.shape[2]} and {C.shape[2]}")
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if initial_states is not None:
        expected = (b, h, p, B.shape[-1])
        if tuple(initial_states.shape) != expected:
            raise ValueError(f"initial_states must be (b, h, p, n) = {expected}, got {tuple(initial_states.shape)}")
        initial_states = initial_states.to(dtype)
    return x, dt, A, B, C, initial_states


def _finish(y, x, D, out_dtype, final, return_final_states):
    if D is not None:
        y = y + x * D.to(y.dtype)[:, None]
    y = y.to(out_dtype)
    return (y, final) if return_final_states else y


def ssd_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_states=None,
            return_final_states=False):
    """The sequential definition, per head: h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T, y_t = h_t C_t + D x_t.
    Shapes as in the module docstring; returns y (b, l, h, p) in x's dtype, and with return_final_states the
    state after the last step (b, h, p, n) in the compute dtype."""
    out_dtype = x.dtype
    x, dt, A, B, C, state = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_states)
    b, l, h, p = x.shape
    B, C = (repeat(M, "b l g n -> b l (g r) n", r=h // M.shape[2]) for M in (B, C))  # a group serves h / g heads
    state = x.new_zeros(b, h, p, B.shape[-1]) if state is None else state
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t * A)                                            # (b, h)
        state = decay[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C_t))
    return _finish(torch.stack(ys, dim=1), x, D, out_dtype, state, return_final_states)


def ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False):
    """One step of ssd_ref, for decoding: state (b, h, p, n); x (b, h, p); dt (b, h); B, C (b, g, n).
    Returns (new state in state's dtype, y (b, h, p) in x's dtype)."""
    y, new = ssd_ref(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, dt_softplus, state, True)
    return new.to(state.dtype), y[:, 0]


def _segsum(a):
    """a (..., T) -> (..., T, T): out[..., t, s] = a[s+1] + ... + a[t] for s <= t (0 on the diagonal) and -inf
    above it, so that exp(out) is the decay from step s to step t, masked to the causal part. The sums are
    differences of cumulative sums taken in float64: in float32 the difference of two large sums (they reach
    T max|Δ A| within a chunk) would keep few digits of a small one; and above the diagonal, where the
    difference is positive and exp could overflow, it is replaced by -inf before any exp."""
    T = a.shape[-1]
    total = torch.cumsum(a.to(torch.float64), dim=-1)
    # total_t - total_s, written as a sum with -total so that backward negates a vector, not a (T, T) matrix
    summed = (total[..., :, None] + (-total)[..., None, :]).to(a.dtype)                    # [t, s]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))               # s <= t
    return summed.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_states=None,
                return_final_states=False, chunk_size=256):
    """The chunked SSD algorithm (the module docstring's four steps): the same results as ssd_ref, any length
    (the last chunk is padded with steps that neither decay nor write), differentiable by autograd. Heads are
    laid out as g groups of r = h / g, so that C_t · B_s, shared by a group's heads, is computed once a group."""
    out_dtype = x.dtype
    x, dt, A, B, C, state = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_states)
    b, l, h, p = x.shape
    g, n, T = B.shape[2], B.shape[3], chunk_size
    pad = -l % T  # padded steps: Δ = 0, so exp(0 A) = 1 and Δ x = 0: the state passes them unchanged

    def chunks(t, pattern):
        return rearrange(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)), pattern, t=T, g=g)
    X = chunks(x * dt[..., None], "b (c t) (g r) p -> b c t g r p")              # Δ_t x_t
    a = chunks(dt * A, "b (c t) (g r) -> b g r c t")                             # Δ_t A <= 0
    B, C = (chunks(M, "b (c t) g n -> b c t g n") for M in (B, C))
    segment = _segsum(a)                                                         # (b, g, r, c, T, T)

    # 1. within each chunk: y_t = Σ_{s<=t} (C_t · B_s) exp(a_{s+1} + ... + a_t) X_s, the masked "attention"
    scores = torch.einsum("bctgn,bcsgn->bgcts", C, B)                            # once per group
    y = torch.einsum("bgrcts,bcsgrp->bctgrp", scores[:, :, None] * torch.exp(segment), X)
    # 2. each chunk's final state from zero: the last row of the segment sums is the decay to the chunk's end
    to_end = rearrange(torch.exp(segment[..., -1, :]), "b g r c s -> b c s g r 1")
    ends = torch.einsum("bcsgn,bcsgrp->bcgrpn", B, X * to_end)                  # (b, c, g, r, p, n)
    # 3. the chain between chunks, one chunk at a time: memory stays linear in l
    chunk_decay = torch.exp(a.sum(-1))                                           # (b, g, r, c)
    state = x.new_zeros(b, h, p, n) if state is None else state
    state = rearrange(state, "b (g r) p n -> b g r p n", g=g)
    entering = []
    for k in range(X.shape[1]):
        entering.append(state)
        state = chunk_decay[..., k, None, None] * state + ends[:, k]
    # 4. what entered each chunk, decayed to each of its steps and read out by C_t
    from_start = rearrange(torch.exp(torch.cumsum(a, dim=-1)), "b g r c t -> b c t g r 1")   # exp(a_1 + ... + a_t)
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", C, torch.stack(entering, dim=1)) * from_start
    y = rearrange(y, "b c t g r p -> b (c t) (g r) p")[:, :l]
    return _finish(y, x, D, out_dtype, rearrange(state, "b g r p n -> b (g r) p n"), return_final_states)
