"""The Transformer baseline: a GPT-style decoder that the same trainer trains, to compare with Mamba (paper Fig. 4).

Read it beside model.py: the language model around the blocks is the same (a tied embedding, pre-norm residual
blocks with RMSNorm, a float32 residual stream, a final norm, lm_head), and only the block differs:
    Mamba block (model.py)     x + mixer(norm(x))                       a state of fixed size per layer
    Transformer block (here)   x + attention(norm(x)); x + mlp(norm(x))  the keys and values of every past token
It is the "Transformer++" the paper compares against (section 4.2.1): rotary positions (RoPE, Su et al. 2021)
instead of learned ones, a SwiGLU MLP (Shazeer 2020), RMSNorm, no biases.

Symbols (beside model.py's)
  l        positions read in this call (queries)      t   positions attended to (keys: the past and these)
  n_head   attention heads, each of d_head = d_model / n_head channels
  d_ff     the MLP's hidden width, expand * d_model (SwiGLU has three d_model x d_ff matrices)
[model] layer = transformer selects it; of [model] it reads d_model, n_layer, n_head, expand, norm_eps, bias,
vocab_size, pad_vocab_size_multiple and tie_embeddings. Parameters per block: 4 d_model^2 (attention) + 3 d_model
d_ff (MLP), against about 6.8 d_model^2 for a default Mamba block; the paper matches sizes with two Mamba blocks
per Transformer block, as configs/transformer.ini does.

The cache (allocate_cache) is, per layer, [keys, values, valid, length]: keys and values (b, n_head, capacity,
d_head) written at positions 0 .. length - 1, valid (b, capacity) false on left padding, which no later token
attends to; its capacity doubles when full. Unlike Mamba's state it grows with the text: a token costs O(t).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mamba_config import MambaConfig
from model import PREFILL_CHUNK, RMSNorm, _compute_dtype
from sampling import Generation, check_left_padding

ROPE_BASE = 10000.0  # the rotation of channel pair i turns by position / ROPE_BASE^(2i / d_head): RoPE's choice


def rotate(x, positions):
    """RoPE: x (b, h, l, d_head) -> x with channel pair (i, i + d_head/2) turned by angle positions * freq_i, so
    that q_i . k_j depends on i - j only (the GPT-NeoX arrangement of the pairs). positions (l,)."""
    half = x.shape[-1] // 2
    freq = ROPE_BASE ** -(torch.arange(half, device=x.device, dtype=torch.float32) / half)        # (half,)
    angle = positions.to(torch.float32)[:, None] * freq                                          # (l, half)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d_head) + causal mask) v per head, (b, l, d_model) -> (b, l, d_model)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x, cache=None, mask=None):
        """x (b, l, d_model) -> (b, l, d_model). With a layer's cache, attends to what it holds too and appends
        this call's keys and values; mask (b, l): 0 on left padding, never attended to."""
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.n_head)
        start = 0 if cache is None else int(cache[3])
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k = rotate(q, positions), rotate(k, positions)
        if cache is None and mask is None:  # training: the plain causal case, the fused kernel's fast path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            valid = torch.ones_like(positions, dtype=torch.bool).expand(x.shape[0], -1) if mask is None \
                else mask.bool()
            if cache is not None:
                k, v, valid = _append(cache, k, v, valid)
            # One new token with no padding anywhere reads every key: nothing to mask (a decoding step).
            allowed = None if x.shape[1] == 1 and bool(valid.all()) else _allowed(positions, valid)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(rearrange(y, "b h l e -> b l (h e)"))


def _append(cache, k, v, valid):
    """Writes keys and values (b, h, l, e) and valid (b, l) after the cache's length, doubling its capacity when
    they do not fit; returns everything written so far: keys, values (b, h, t, e) and valid (b, t)."""
    keys, values, written, length = cache
    start, end = int(length), int(length) + k.shape[2]
    if end > keys.shape[2]:
        capacity = max(end, 2 * keys.shape[2])
        grown = [t.new_zeros(*t.shape[:2], capacity, *t.shape[3:]) for t in (keys, values)]
        for new, old in zip(grown, (keys, values)):
            new[:, :, :start] = old[:, :, :start]
        cache[0], cache[1] = keys, values = grown
        cache[2] = written = torch.cat([written[:, :start], written.new_zeros(written.shape[0], capacity - start)], 1)
    keys[:, :, start:end], values[:, :, start:end], written[:, start:end] = k, v, valid
    length.fill_(end)
    return keys[:, :, :end], values[:, :, :end], written[:, :end]


def _allowed(positions, valid):
    """The attention mask (b, l, t), True where query i may read key j: j <= positions[i] (causal) and j is a
    token, not padding. A padding query reads itself, so that its (unused) softmax has something to normalise."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    causal = keys[None, :] <= positions[:, None]                                   # (l, t)
    return (causal & valid[:, None, :]) | (keys[None, :] == positions[:, None])


class SwiGLU(nn.Module):
    """The MLP: down(silu(gate(x)) * up(x)), d_model -> d_ff -> d_model (Shazeer 2020; LLaMA's MLP)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        d_ff = config.expand * config.d_model
        self.gate_proj = nn.Linear(config.d_model, d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=config.bias)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x)); the residual x in float32, as Mamba's Block."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attention(self.norm(x), cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(Generation, nn.Module):
    """token ids -> embedding -> n_layer Transformer blocks -> final RMSNorm -> lm_head, with MambaLM's interface
    (forward, allocate_cache, prefill, step, optim_groups), so that train.py, generate.py and evaluate.py use it
    unchanged. Logits cover padded_vocab_size ids, as MambaLM's."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        # GPT-2's initialisation: N(0, 0.02) everywhere, the two projections into the residual stream scaled by
        # 1/sqrt(2 n_layer) (each block adds two terms to it), the same reasoning as Mamba's out_proj.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                residual = name.endswith(("attention.out_proj.weight", "mlp.down_proj.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02)

    def forward(self, input_ids, cache=None, attention_mask=None):
        """input_ids (b, l) -> logits (b, l, padded_vocab_size); with a cache (allocate_cache), attends to what it
        holds and appends these tokens to it."""
        x = self.embedding(input_ids)
        x = x.to(_compute_dtype(x.dtype))
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i], attention_mask)
        return self.lm_head(self.norm_f(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self, weight_decay):
        """AdamW parameter groups with MambaLM's rule: weight decay on the blocks' matrices only (attention and
        MLP), not on norm gains, biases or the embedding."""
        named = list(self.named_parameters())
        decayed = [p for name, p in named if name.startswith("layers.") and p.dim() == 2]
        others = [p for name, p in named if not (name.startswith("layers.") and p.dim() == 2)]
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]

    # ---- inference with a KV cache: the cache, and the work per token, grow with the context --------------

    def allocate_cache(self, batch_size, device=None, dtype=None):
        """Empty caches, [keys, values, valid, length] per layer (the module docstring); they grow as they fill."""
        device = self.lm_head.weight.device if device is None else device
        dtype = self.lm_head.weight.dtype if dtype is None else dtype
        h = self.config.n_head
        shape = (batch_size, h, 0, self.config.d_model // h)
        return [[torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                 torch.zeros(batch_size, 0, device=device, dtype=torch.bool),
                 torch.zeros((), device=device, dtype=torch.long)] for _ in self.layers]

    @torch.inference_mode()
    def prefill(self, input_ids, cache, attention_mask=None, chunk_size=PREFILL_CHUNK):
        """Reads input_ids (b, l), l >= 1, into the cache, chunk_size tokens at a time (each chunk's queries
        attend to every key before them); returns the last token's logits (b, padded_vocab_size)."""
        if input_ids.shape[1] == 0:
            raise ValueError("prefill needs at least one token; for an empty prompt, step from a fresh cache")
        if attention_mask is not None:
            check_left_padding(attention_mask, input_ids)
        for start in range(0, input_ids.shape[1], chunk_size):
            piece = slice(start, start + chunk_size)
            mask = None if attention_mask is None else attention_mask[:, piece]
            logits = self(input_ids[:, piece], cache, mask)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, token_ids, cache):
        """token_ids (b,) -> logits (b, padded_vocab_size) of the next token; appends it to the cache."""
        return self(token_ids[:, None], cache)[:, 0]
