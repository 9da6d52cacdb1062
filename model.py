"""Mamba language model (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

Symbols (the paper's, used in names, docstrings and shapes below; shapes in einops notation)
  b        batch size                         l        sequence length
  d_model  width of the residual stream       d_inner  width inside a mixer, expand * d_model (E * D in the paper)
  n        state size per channel (d_state, N in the paper)
  dt_rank  rank of the low-rank projection that produces Δ
  u        input of the selective scan (the conv branch), (b, d_inner, l)
  Δ (dt)   input-dependent step size, (b, d_inner, l): Δ = softplus(dt_proj(x_proj(u)) + dt_bias)
  A        state matrix, diagonal, real and negative, (d_inner, n); stored as A_log = log(-A)
  B, C     input-dependent input / output matrices, (b, n, l): "selection" = B, C, Δ depend on the token
  D        skip connection, (d_inner,): y_t += D u_t
  z        gate branch, (b, d_inner, l): y *= silu(z)
  h        recurrent state, (b, d_inner, n):  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t h_t + D u_t

Parameter names follow the official checkpoints (mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel), so the
state_dict of an official Mamba loads as is: backbone.embedding, backbone.layers.N.{norm, mixer.{in_proj, conv1d,
x_proj, dt_proj, A_log, D, out_proj}}, backbone.norm_f, lm_head.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import checkpoint
from causal_conv import causal_conv1d, causal_conv1d_step
from mamba2 import Mamba2Mixer
from mamba_config import MambaConfig, pretrained_config
from sampling import Generation, check_left_padding
from selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update, to_dtype

PREFILL_CHUNK = 2048  # tokens a prefill reads at a time: its memory is that of a chunk, whatever the prompt


def _compute_dtype(dtype):
    """float32, or float64 for a float64 model: the precision of norms, the residual stream and the SSM state."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _along_time(pattern, x):
    """rearrange(x, pattern) for a sequence; one decoding step has no time axis, so nothing to move."""
    return rearrange(x, pattern) if x.dim() == 3 else x


def _rows_per_input(weight):
    """A Linear's weight (out, in), same shape and values, laid out in memory as its transpose: one row of `out`
    numbers per input. Decoding one token multiplies a vector by every weight, and on a CPU (MKL) that product
    runs markedly faster over this layout than over nn.Linear's row per output (bench/bench_generate.py; figures
    in docs/performance.md); training's matrix products take either layout alike. load_state_dict copies into
    it and .to() keeps it, so state_dicts and published checkpoints are unchanged."""
    return nn.Parameter(weight.detach().t().contiguous().t())


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        """x (..., d) -> (..., d) in the weight's dtype (the dtype the next Linear expects). F.rms_norm is this
        formula in one operation (a decoding step runs nine norms on tensors of d numbers)."""
        x, weight = to_dtype(x, _compute_dtype(x.dtype)), self.weight
        return to_dtype(F.rms_norm(x, (x.shape[-1],), to_dtype(weight, x.dtype), self.eps), weight.dtype)


class MambaMixer(nn.Module):
    """The Mamba block of the paper's Figure 3 (official `mamba_simple.Mamba`), (b, l, d_model) -> (b, l, d_model):

        x, z = in_proj(hidden)                       two branches, (b, l, d_inner) each
        u = silu(causal_depthwise_conv1d(x))         local mixing along time (the scan reads u as (b, d_inner, l))
        dt, B, C = x_proj(u);  Δ = softplus(dt_proj(dt))      the selection: Δ, B, C depend on the input
        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t;  y_t = C_t h_t + D u_t     (selective scan)
        out = out_proj(y * silu(z))                  (gate = false: out_proj(y), and in_proj makes no z)

    The selectivity switches of the config (ablations, paper Table 7) replace an input-dependent parameter by a
    learned constant: Δ by softplus(dt_bias) per channel, B or C by a (d_inner, n) matrix. With selective_A, A gets
    an input-dependent factor per channel and step, A_t = A * softplus(A_proj(a_t)), a_t from x_proj like dt.
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = config.d_inner, config.d_state, config.d_conv
        self.dt_rank = config.dt_rank_value
        self.scan = selective_scan_fn if config.scan == "fast" else selective_scan_ref
        self.gate = config.gate
        self.in_proj = nn.Linear(config.d_model, (1 + self.gate) * self.d_inner, bias=config.bias)  # x (and z)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, config.d_conv, groups=self.d_inner,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.act = nn.SiLU()  # a module (as in the official block) so that tools can hook u, the scan's input
        # x_proj produces the input-dependent parameters, in this order: dt (dt_rank), B (n), C (n), a (dt_rank).
        self.selective = {"delta": config.selective_delta, "B": config.selective_B, "C": config.selective_C,
                          "A": config.selective_A}
        widths = {"delta": self.dt_rank, "B": self.d_state, "C": self.d_state, "A": self.dt_rank}
        self.x_proj_parts = [k for k, on in self.selective.items() if on]
        self.split = [widths[k] for k in self.x_proj_parts]
        self.x_proj = nn.Linear(self.d_inner, sum(self.split), bias=False) if self.split else None
        if config.selective_delta:
            self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        else:
            self.dt_bias = nn.Parameter(torch.empty(self.d_inner))
        if not config.selective_B:
            self.B = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        if not config.selective_C:
            self.C = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        if config.selective_A:
            self.A_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # A is learnt as A_log = log(-A): A = -exp(A_log) stays negative whatever the optimiser does, so
        # exp(Δ A) < 1 and the state decays instead of blowing up. Kept in float32 even in low-precision models.
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self._A_kept = None  # (key, A log2(e)) for decoding, see _A_log2e
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=config.bias)
        self._init_weights(config)
        # after the initialisation, which then fills them in the order it always did (same values for a seed)
        self.in_proj.weight = _rows_per_input(self.in_proj.weight)
        self.out_proj.weight = _rows_per_input(self.out_proj.weight)

    def _dt_bias(self):
        """The bias added to dt before the softplus: dt_proj's (selective Δ) or the per-channel dt_bias."""
        return self.dt_proj.bias if self.selective["delta"] else self.dt_bias

    def _A(self, dtype):
        """A = -exp(A_log) (d_inner, n) in dtype."""
        return -torch.exp(to_dtype(self.A_log, dtype))

    def _A_log2e(self, dtype):
        """A log2(e) (d_inner, n) in dtype, for step's exp(Δ A) = exp2(Δ A log2(e)), faster than exp on the CPU as in
        the scan (selective_scan._log2_rate). Kept between tokens and made again only when A_log has changed (its
        storage or its version counter, which every in-place update bumps: optimizer steps, load_state_dict): else
        each token would pay an exp over d_inner x n in every layer. Like autograd's checks, the counter does not
        see writes through .data; a model made under inference_mode has no counter at all, and gets it afresh, as
        does a step under autograd (a kept tensor would carry an old graph). Under torch.compile (MambaLM.compile_step)
        it is computed in the graph, where the exp fuses with the operations around it."""
        A_log = self.A_log  # a Parameter: each self.A_log is a Module.__getattr__ call
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or A_log.is_inference():
            return self._A(dtype) * math.log2(math.e)
        key = (A_log.data_ptr(), A_log._version, dtype)
        if self._A_kept is None or self._A_kept[0] != key:
            self._A_kept = (key, self._A(dtype) * math.log2(math.e))
        return self._A_kept[1]

    @torch.no_grad()
    def _init_weights(self, config):
        """The official initialisation (conv1d keeps PyTorch's default, as there)."""
        # Δ starts log-uniform in [dt_min, dt_max]: channels begin with a spread of time scales, from
        # remembering long (small Δ) to following the current token (large Δ).
        log_min, log_max = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min).clamp(min=config.dt_init_floor)
        # Δ = softplus(dt_proj(...) + bias), so the bias is softplus⁻¹(dt) = dt + log(1 - exp(-dt)): Δ ≈ dt at init.
        self._dt_bias().copy_(dt + torch.log(-torch.expm1(-dt)))
        bound = self.dt_rank ** -0.5 * config.dt_scale
        if config.selective_delta:
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        if config.selective_A:  # A_t = A at init on average: softplus(bias) = 1, inputs spread it like dt's
            nn.init.uniform_(self.A_proj.weight, -bound, bound)
            nn.init.constant_(self.A_proj.bias, math.log(math.e - 1))
        # Fixed B and C as in S4D: B = 1, C standard normal (real here).
        if not config.selective_B:
            nn.init.ones_(self.B)
        if not config.selective_C:
            nn.init.normal_(self.C)
        # S4D-real: A = -(1, 2, ..., n) in every channel, a range of decay rates per channel.
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        nn.init.ones_(self.D)
        for linear in (self.in_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        # Each block adds its output to the residual stream, whose variance so grows with depth; scaling the
        # last projection by 1/sqrt(n_layer) keeps it O(1) at init (GPT-2 recipe; official rescale_prenorm_residual).
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(config.n_layer)

    def ssm_params(self, u):
        """u (b, d_inner, l) -> the selective scan's other inputs, in its layout (paper Algorithm 2, S6), as a dict.
        One line per parameter, the official (selective) value first; an ablation switch swaps in its constant:
            A        (d_inner, n) float32   A = -exp(A_log), never input-dependent
            B, C     (b, n, l)              s_B(u), s_C(u): slices of x_proj(u)      [fixed: (d_inner, n) matrices]
            dt       (b, d_inner, l)        dt_proj.weight @ s_Δ(u), Δ before its bias: the scan computes
                                            Δ = softplus(dt + dt_bias) in float32, as the official kernel does
                                                                                     [fixed: 0, Δ = softplus(dt_bias)]
            dt_bias  (d_inner,) float32
            A_scale  (b, d_inner, l)        softplus(A_proj(s_A(u))), A_t = A * A_scale_t [not selective: None]
        The same for one decoding step: u (b, d_inner) gives B, C (b, n) and dt, A_scale (b, d_inner)."""
        s, f32 = self.selective, _compute_dtype(self.A_log.dtype)  # float32 (float64 in a float64 model)
        parts = {} if self.x_proj is None else dict(  # x_proj reads u time-major: (b, l, d_inner) -> (b, l, R + 2n)
            zip(self.x_proj_parts, self.x_proj(_along_time("b d l -> b l d", u)).split(self.split, dim=-1)))
        A = self._A(f32)
        B = _along_time("b l n -> b n l", parts["B"]) if s["B"] else self.B
        C = _along_time("b l n -> b n l", parts["C"]) if s["C"] else self.C
        dt = _along_time("b l d -> b d l", F.linear(parts["delta"], self.dt_proj.weight)) if s["delta"] \
            else u.new_zeros(()).expand(u.shape)
        A_scale = _along_time("b l d -> b d l", F.softplus(self.A_proj(parts["A"]).to(f32))) if s["A"] else None
        return {"A": A, "B": B, "C": C, "dt": dt, "dt_bias": to_dtype(self._dt_bias(), f32), "A_scale": A_scale}

    def forward(self, hidden, cache=None, mask=None):
        """hidden (b, l, d_model) -> (b, l, d_model). With cache = (conv_state, ssm_state), continues from them (the
        last d_conv conv inputs (b, d_inner, d_conv) and the state h_0 (b, d_inner, n)) and leaves there those after
        the last position, so a sequence read in pieces gives what one pass gives. mask (b, l): 1 on tokens, 0 on
        left padding, which never enters the conv window or the state."""
        x, z = self._branches(self.in_proj(hidden), -1)          # (b, l, d_inner) each: time-major until the scan
        keep = None if mask is None else mask[:, :, None].to(x.dtype)                # (b, l, 1)
        if keep is not None:
            x = x * keep  # padding as zeros: what the conv window holds before a sequence's first token
        u = self.act(causal_conv1d(x, self.conv1d, None if cache is None else cache[0]))    # (b, l, d_inner)
        # The scan's layout is (b, d_inner, l): views of the time-major tensors, which its chunking and x_proj
        # read by whole rows
        u, z, keep = (None if t is None else rearrange(t, "b l d -> b d l") for t in (u, z, keep))
        p = self.ssm_params(u)
        dt, dt_bias = p["dt"], p["dt_bias"]
        if keep is not None:  # Δ = 0 on padding: exp(0 A) = 1 and no input, the state passes through unchanged
            dt, dt_bias = F.softplus(dt.to(dt_bias.dtype) + dt_bias[:, None]) * keep, None
        y = self.scan(u, dt, p["A"], p["B"], p["C"], to_dtype(self.D, torch.float32), z=z, delta_bias=dt_bias,
                      delta_softplus=keep is None, return_last_state=cache is not None, A_scale=p["A_scale"],
                      initial_state=None if cache is None else cache[1])
        if cache is not None:
            y, last_state = y
            cache[1].copy_(last_state)
        return self.out_proj(rearrange(y, "b d l -> b l d"))

    def _branches(self, projected, dim):
        """in_proj's output, (1 + gate) d_inner wide along dim -> x, z; z is None without the gate."""
        return projected.chunk(2, dim=dim) if self.gate else (projected, None)

    def state_shapes(self):
        """The shapes of one sequence's (conv window, SSM state)."""
        return (self.d_inner, self.d_conv), (self.d_inner, self.d_state)

    def step(self, hidden, conv_state, ssm_state):
        """One token, hidden (b, d_model) -> (b, d_model): forward() for l = 1, the scan replaced by one step of
            h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,    y_t = C_t h_t + D u_t,    y_t silu(z_t)
        Updates conv_state (b, d_inner, d_conv) and ssm_state (b, d_inner, n) in place. Written out for the
        official block (Δ, B, C selective) in as few operations as the recurrence allows: at this size a token's
        time is the overhead of its few dozen operations per layer more than their arithmetic. The ablations take
        step_reference, the same computation through ssm_params and selective_state_update, which this one is
        tested against (tests/test_model.py). The Linears and the activation are called as functions, F.linear on
        their weights: a module call first checks for hooks, microseconds that a token would pay four times a layer
        (forward hooks, as look_inside.py's, see forward passes, not steps)."""
        if self.x_proj_parts != ["delta", "B", "C"]:
            return self.step_reference(hidden, conv_state, ssm_state)
        f32 = ssm_state.dtype  # the state's precision (float32, float64 in a float64 model) for the recurrence
        x, z = self._branches(F.linear(hidden, self.in_proj.weight, self.in_proj.bias), -1)     # (b, d_inner) each
        u = F.silu(causal_conv1d_step(x, self.conv1d, conv_state))            # the window · the filter
        dt, B, C = F.linear(u, self.x_proj.weight).split(self.split, dim=-1)  # (b, dt_rank), (b, n), (b, n)
        delta = F.softplus(to_dtype(F.linear(dt, self.dt_proj.weight), f32) + to_dtype(self.dt_proj.bias, f32))
        u, B, C = to_dtype(u, f32), to_dtype(B, f32), to_dtype(C, f32)
        ssm_state.mul_(torch.exp2(delta[..., None] * self._A_log2e(f32)))     # exp(Δ A) h       (b, d_inner, n)
        ssm_state.baddbmm_((delta * u)[..., None], B[:, None, :])            # + (Δ u) B^T, an outer product
        y = torch.addcmul(torch.bmm(ssm_state, C[..., None])[..., 0], u, to_dtype(self.D, f32))    # C h + D u
        if z is not None:
            y = y * F.silu(to_dtype(z, f32))
        return F.linear(to_dtype(y, x.dtype), self.out_proj.weight, self.out_proj.bias)

    def step_reference(self, hidden, conv_state, ssm_state):
        """step() for every configuration (ablations included), through the functions forward() uses."""
        x, z = self._branches(self.in_proj(hidden), -1)                          # (b, d_inner) each
        u = self.act(causal_conv1d_step(x, self.conv1d, conv_state))
        p = self.ssm_params(u)
        # selective: (b, n) as the official kernel takes them; fixed: (1, d_inner, n)
        B, C = (p[k] if self.selective[k] else p[k][None] for k in ("B", "C"))
        D = to_dtype(self.D, torch.float32)
        new_state, y = selective_state_update(ssm_state, u, p["dt"], p["A"], B, C, D, z=z, delta_bias=p["dt_bias"],
                                              delta_softplus=True, A_scale=p["A_scale"])
        ssm_state.copy_(new_state)
        return self.out_proj(y)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), the residual x in float32 (official residual_in_fp32)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        c = config
        self.mixer = MambaMixer(c) if c.layer == "mamba1" else Mamba2Mixer(
            c.d_model, c.n_layer, c.d_state, c.d_conv, c.expand, c.headdim, c.ngroups, c.chunk_size, c.dt_min,
            c.dt_max, c.dt_init_floor, bias=c.bias, conv_bias=c.conv_bias, norm_eps=c.norm_eps)

    def forward(self, x, cache=None, mask=None):
        """x (b, l, d_model) -> (b, l, d_model)."""
        return x + self.mixer(self.norm(x), cache, mask)

    def step(self, x, conv_state, ssm_state):
        """x (b, d_model) -> (b, d_model), one token (the norm's forward called directly, as in MambaMixer.step)."""
        return x + self.mixer.step(self.norm.forward(x), conv_state, ssm_state)


class MambaBackbone(nn.Module):
    """token ids -> embedding -> n_layer blocks -> final RMSNorm."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def _embed(self, ids):
        # The residual stream is summed over all layers; keeping it in float32 (official residual_in_fp32) avoids
        # rounding it at every layer when the weights or activations are bfloat16.
        x = self.embedding(ids)
        return to_dtype(x, _compute_dtype(x.dtype))

    def forward(self, input_ids, cache=None, mask=None):
        """input_ids (b, l) -> hidden (b, l, d_model); with a cache (list per layer), continues from it."""
        x = self._embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i], mask)
        return self.norm_f(x)

    def step(self, token_ids, cache):
        """token_ids (b,) -> hidden (b, d_model), advancing every layer's cache by one token."""
        x = self._embed(token_ids)
        for layer, (conv_state, ssm_state) in zip(self.layers, cache):
            x = layer.step(x, conv_state, ssm_state)
        return self.norm_f.forward(x)


class MambaLM(Generation, nn.Module):
    """Mamba language model: backbone then lm_head. Logits cover padded_vocab_size ids; the padding ids are never
    targets (training pushes them down) and never sampled."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        # Untied, lm_head keeps PyTorch's default Linear init, as in the official model.
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._compiled_step = None  # see compile_step

    def forward(self, input_ids, cache=None, attention_mask=None):
        """input_ids (b, l) int64 -> logits (b, l, padded_vocab_size); with a cache (allocate_cache), continues from
        the state it holds and leaves the state after the last token there."""
        return self.lm_head(self.backbone(input_ids, cache, attention_mask))

    @classmethod
    def from_pretrained(cls, path) -> "MambaLM":
        """A published Mamba (original or Hugging Face layout, see checkpoint.py) from a directory or a hub name,
        in eval mode on the CPU, in float32 whatever dtype its weights were stored in."""
        folder = checkpoint.resolve(path)
        model = cls(pretrained_config(folder))
        model.load_pretrained_weights(folder)
        return model.eval()

    def load_pretrained_weights(self, folder):
        """Copy a published checkpoint's weights into this model, whose config must be the checkpoint's."""
        self.load_state_dict(checkpoint.read_pretrained_weights(folder, self.state_dict(), self.config.tie_embeddings))

    def save_pretrained(self, directory):
        """config.json + model.safetensors that transformers.MambaForCausalLM.from_pretrained reads (and
        from_pretrained reads back with the same config); returns the weight file."""
        return checkpoint.write_pretrained(directory, self.config, self.state_dict())

    def num_params(self) -> int:
        """Number of parameters, the tied embedding counted once (parameters() yields a shared tensor once)."""
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self, weight_decay):
        """AdamW parameter groups: weight decay on the mixers' Linear weight matrices (in_proj, x_proj, dt_proj,
        A_proj, out_proj) only. Not on A_log and D (official _no_weight_decay: decay would pull A towards -1 and the
        skip towards 0), the ablations' fixed B, C, dt_bias (as S4), biases, norm gains, the conv filters (gains more
        than matrices), nor the embedding (decay would shrink rare tokens' rows at every step)."""
        decayed = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "A_proj.weight", "out_proj.weight")
        named = list(self.named_parameters())  # shared tensors appear once, under their first name
        return [{"params": [p for name, p in named if name.endswith(decayed)], "weight_decay": weight_decay},
                {"params": [p for name, p in named if not name.endswith(decayed)], "weight_decay": 0.0}]

    # ---- recurrent inference: O(1) work and memory per new token -------------------------------------------

    def allocate_cache(self, batch_size, device=None, dtype=None):
        """Zero states, one (conv_state, ssm_state) per layer, shaped as its mixer's state_shapes say (Mamba-1:
        (b, d_inner, d_conv) and (b, d_inner, n)). conv_state is in dtype (default: the model's); ssm_state in at
        least float32, since it accumulates over every token."""
        device = self.lm_head.weight.device if device is None else device
        dtype = self.lm_head.weight.dtype if dtype is None else dtype
        shapes = [layer.mixer.state_shapes() for layer in self.backbone.layers]
        return [(torch.zeros(batch_size, *conv, device=device, dtype=dtype),
                 torch.zeros(batch_size, *ssm, device=device, dtype=_compute_dtype(dtype))) for conv, ssm in shapes]

    @torch.inference_mode()
    def prefill(self, input_ids, cache, attention_mask=None, chunk_size=PREFILL_CHUNK):
        """Reads input_ids (b, l), l >= 1, by the parallel scan, continuing from what the cache holds (a fresh one:
        from the start) and chunk_size tokens at a time, so that memory does not grow with l; leaves the state
        after the last token in the cache and returns that token's logits (b, padded_vocab_size). One token is
        one step. attention_mask (b, l): left padding (sampling.py)."""
        if input_ids.shape[1] == 0:
            raise ValueError("prefill needs at least one token; for an empty prompt, step from a fresh cache")
        if attention_mask is not None:
            check_left_padding(attention_mask, input_ids)
        if input_ids.shape[1] == 1 and (attention_mask is None or attention_mask.all()):
            return self.step(input_ids[:, 0], cache)  # what the token would cost after a prefill: the same numbers
        for start in range(0, input_ids.shape[1], chunk_size):
            piece = slice(start, start + chunk_size)
            mask = None if attention_mask is None else attention_mask[:, piece]
            hidden = self.backbone(input_ids[:, piece], cache, mask)
        return self.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def step(self, token_ids, cache):
        """token_ids (b,) -> logits (b, padded_vocab_size) of the next token; updates the cache in place."""
        if self._compiled_step is None:
            return self._step(token_ids, cache)
        # a fresh (b,) tensor: the graph's guards check strides, and a prompt's column (b, l)[:, -1] has others
        return self._compiled_step(token_ids.clone(memory_format=torch.contiguous_format), cache)

    def _step(self, token_ids, cache):
        return F.linear(self.backbone.step(token_ids, cache), self.lm_head.weight)

    def compile_step(self):
        """Makes step() run through torch.compile from now on, and returns the model. Eager, a token costs the
        dispatch of a few dozen small operations per layer more than their arithmetic; compiled, the elementwise
        ones fuse into a few kernels around the matrix products (the speed-up: docs/performance.md). The cache has
        the same shapes at every token, so one graph per batch size serves a whole generation, compiled during its
        first step (seconds; on a CPU torch.compile needs a C++ compiler). fullgraph: a graph break is an error,
        not a silent return to eager speed."""
        self._compiled_step = torch.compile(self._step, dynamic=False, fullgraph=True)
        return self
