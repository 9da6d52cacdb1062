"""The Mamba-2 block (Dao & Gu 2024, official `mamba_ssm/modules/mamba2.py`), built on ssd.py's scan.

Symbols (beside model.py's): h heads of p = headdim channels each (d_inner = h p), g groups of heads that share
B and C, n = d_state per head and channel. What changed from Mamba-1's block, and why (the paper's section 7):
  - A is one negative scalar per head (A_log (h,)), Δ one step per head (dt (b, l, h)): the SSM is then a masked,
    attention-like matrix per head (state space duality), computed by matrix products (ssd_chunked);
  - B and C come straight from in_proj, with x and z, in one projection (no x_proj / dt_proj), and go through
    the causal conv with x, like keys and queries;
  - the output is normalised, norm(y * silu(z)) per group (a gated RMSNorm), before out_proj.

    z, xBC, dt = in_proj(hidden)                     (b, l, d_inner), (b, l, d_inner + 2 g n), (b, l, h)
    x, B, C = silu(causal_conv1d(xBC))               (b, l, h, p), (b, l, g, n), (b, l, g, n)
    Δ = softplus(dt + dt_bias), clamped to dt_limit
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T;  y_t = h_t C_t + D x_t          (ssd.py)
    out = out_proj(rmsnorm_per_group(y * silu(z)) * norm.weight)

Parameter names are the official ones (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), which
transformers' Mamba2 uses too.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from causal_conv import causal_conv1d, causal_conv1d_step
from ssd import ssd_chunked, ssd_state_update


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)) over groups of group_size channels, times weight (official RMSNormGated with
    norm_before_gate=False), computed in float32. y, z (..., d) -> (..., d) in y's dtype."""

    def __init__(self, d, group_size, eps):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y, z):
        gated = rearrange(y.float() * F.silu(z.float()), "... (g c) -> ... g c", c=self.group_size)
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (rearrange(normed, "... g c -> ... (g c)") * self.weight.float()).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block, (b, l, d_model) -> (b, l, d_model), with the official defaults and initialisation.
    n_layer scales out_proj's initial weights by 1/sqrt(n_layer), as Mamba-1's block does."""

    def __init__(self, d_model, n_layer=1, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                 chunk_size=256, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16),
                 dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, norm_eps=1e-5):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim or (self.d_inner // headdim) % ngroups:
            raise ValueError(f"d_inner = {self.d_inner} must be a whole number of heads of headdim {headdim}, "
                             f"in ngroups = {ngroups} equal groups")
        self.nheads, self.headdim, self.ngroups, self.d_state = self.d_inner // headdim, headdim, ngroups, d_state
        self.d_conv, self.chunk_size, self.dt_limit = d_conv, chunk_size, dt_limit
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias)
        self.act = nn.SiLU()
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))  # A = -exp(A_log): one negative scalar per head
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        with torch.no_grad():
            # Δ starts log-uniform in [dt_min, dt_max], and dt_bias = softplus⁻¹ of it (as Mamba-1's dt_proj.bias)
            dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
            self.D.fill_(1.0)
            for linear in (self.in_proj, self.out_proj):
                if linear.bias is not None:
                    linear.bias.zero_()
            self.out_proj.weight /= math.sqrt(n_layer)

    def state_shapes(self):
        """The shapes of one sequence's (conv window, SSM state)."""
        return (self.conv_dim, self.d_conv), (self.nheads, self.headdim, self.d_state)

    def _step_size(self, dt):
        """Δ = softplus(dt + dt_bias), clamped to dt_limit, in float32."""
        delta = F.softplus(dt.float() + self.dt_bias.float())
        return delta if self.dt_limit == (0.0, float("inf")) else delta.clamp(*self.dt_limit)

    def _split(self, xBC):
        """xBC (..., conv_dim) after the conv -> x (..., h, p), B and C (..., g, n)."""
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return (rearrange(x, "... (h p) -> ... h p", p=self.headdim),
                *(rearrange(M, "... (g n) -> ... g n", n=self.d_state) for M in (B, C)))

    def forward(self, hidden, cache=None, mask=None):
        """hidden (b, l, d_model) -> (b, l, d_model). With cache = (conv_state (b, conv_dim, d_conv), ssm_state
        (b, h, p, n)), continues from them and leaves there those after the last position. mask (b, l): 1 on
        tokens, 0 on left padding, which never enters the conv window or the state."""
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        keep = None if mask is None else mask[..., None].to(xBC.dtype)                # (b, l, 1)
        xBC = self.act(causal_conv1d(xBC if keep is None else xBC * keep, self.conv1d,
                                     None if cache is None else cache[0]))
        x, B, C = self._split(xBC)
        delta = self._step_size(dt)
        if keep is not None:  # Δ = 0 on padding: the state passes through unchanged
            delta = delta * keep
        y = ssd_chunked(x, delta, -torch.exp(self.A_log.float()), B, C, self.D, initial_states=None if cache is None
                        else cache[1], return_final_states=cache is not None, chunk_size=self.chunk_size)
        if cache is not None:
            y, last_state = y
            cache[1].copy_(last_state)
        return self.out_proj(self.norm(rearrange(y, "b l h p -> b l (h p)"), z))

    def step(self, hidden, conv_state, ssm_state):
        """One token, hidden (b, d_model) -> (b, d_model), constant cost; updates conv_state and ssm_state in place."""
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        x, B, C = self._split(self.act(causal_conv1d_step(xBC, self.conv1d, conv_state)))
        new_state, y = ssd_state_update(ssm_state, x, self._step_size(dt), -torch.exp(self.A_log.float()), B, C,
                                        self.D)
        ssm_state.copy_(new_state)
        return self.out_proj(self.norm(rearrange(y, "b h p -> b (h p)"), z))
