"""The architecture's configuration ([model] in config.ini): MambaConfig, the parameter count it implies, and the
MambaConfig a published checkpoint describes. model.py builds the model from it; the trainer, the CLIs and the
benchmarks read it without building one.
"""
import math
from dataclasses import dataclass
from typing import Literal

import checkpoint
from config import NON_NEGATIVE, POSITIVE, check_fields, must, option

DT_RANK = (lambda v: v == "auto" or (isinstance(v, int) and v > 0), 'a positive integer or "auto"')


@dataclass
class MambaConfig:
    """The architecture ([model] in config.ini); names and defaults follow the official `Mamba` block and
    `MambaLMHeadModel`, sizes default to this repository's default model. How to train it is TrainConfig's."""
    d_model: int = option(256, "width of the residual stream (D in the paper)", POSITIVE)
    n_layer: int = option(4, "number of blocks (Mamba or Transformer)", POSITIVE)
    vocab_size: int = option(256, "token ids the model reads and predicts; the tokenizer decides it", POSITIVE,
                             derived=True)
    d_state: int = option(16, "SSM state size per channel (N in the paper)", POSITIVE)
    d_conv: int = option(4, "kernel width of the causal depthwise convolution", POSITIVE)
    expand: int = option(2, "expansion factor: d_inner = expand * d_model (E in the paper); "
                                    "transformer: its MLP's width", POSITIVE)
    dt_rank: int | str = option("auto", 'rank of the projection producing Δ; "auto" means ceil(d_model / 16)',
                                DT_RANK)
    dt_min: float = option(0.001, "smallest initial step size Δ (log-uniform in [dt_min, dt_max])", POSITIVE)
    dt_max: float = option(0.1, "largest initial step size Δ", POSITIVE)
    dt_init_floor: float = option(1e-4, "initial Δ is clamped to at least this", NON_NEGATIVE)
    dt_scale: float = option(1.0, "dt_proj weights start uniform in +-dt_scale / sqrt(dt_rank)", POSITIVE)
    conv_bias: bool = option(True, "whether conv1d has a bias")
    bias: bool = option(False, "whether in_proj and out_proj have biases")
    norm_eps: float = option(1e-5, "epsilon of the RMSNorms", POSITIVE)
    pad_vocab_size_multiple: int = option(8, "embedding rows are padded up to a multiple of this", POSITIVE)
    tie_embeddings: bool = option(True, "whether lm_head shares the embedding matrix")
    # The selection mechanism, one switch per SSM parameter (paper section 3.5.2 and Table 7). All off is a
    # linear time-invariant SSM (S4D-real inside the Mamba block) computed by the same scan.
    selective_delta: bool = option(True, "Δ depends on the input (off: one learned step size per channel)")
    selective_B: bool = option(True, "B depends on the input (off: a learned (d_inner, d_state) matrix)")
    selective_C: bool = option(True, "C depends on the input (off: a learned (d_inner, d_state) matrix)")
    selective_A: bool = option(False, "A depends on the input too, A_t = A * softplus(A_proj(u_t)) per channel "
                                      "(the paper's untested hypothesis; not in the official model)")
    scan: Literal["fast", "ref"] = option("fast", 'scan for whole sequences: "fast" (parallel) or "ref" (loop)')
    gate: bool = option(True, "mamba1: out_proj(y * silu(z)); off: out_proj(y), no z branch (Table 1's "
                              '"no gate" architecture)')
    # The block: Mamba-1's (the fields above), Mamba-2's (mamba2.py), which reads the next three and ignores
    # dt_rank, dt_scale, the selectivity switches, gate and scan (its official d_state is 128), or the
    # Transformer baseline's (transformer.py), which reads the sizes, n_head and expand (its MLP's width).
    layer: Literal["mamba1", "mamba2", "transformer"] = option(
        "mamba1", "the block: mamba1 (selective scan), mamba2 (SSD, one A per head, mamba2.py) or transformer "
                  "(attention + MLP, transformer.py)")
    headdim: int = option(64, "mamba2: channels per head (d_inner / headdim heads)", POSITIVE)
    ngroups: int = option(1, "mamba2: groups of heads that share B and C", POSITIVE)
    chunk_size: int = option(256, "mamba2: steps per chunk of the SSD algorithm", POSITIVE)
    n_head: int = option(4, "transformer: attention heads, d_model / n_head channels each", POSITIVE)

    def __post_init__(self):
        check_fields(self)
        must(self, "dt_max", self.dt_max >= self.dt_min, f"at least dt_min = {self.dt_min}")
        if self.layer == "mamba2":
            must(self, "headdim", self.d_inner % self.headdim == 0, f"a divisor of d_inner = {self.d_inner}")
            must(self, "ngroups", self.d_inner // self.headdim % self.ngroups == 0,
                 f"a divisor of the {self.d_inner // self.headdim} heads")
        if self.layer == "transformer":  # RoPE turns pairs of channels: heads of an even width
            must(self, "n_head", self.d_model % self.n_head == 0 and self.d_model // self.n_head % 2 == 0,
                 f"a divisor of d_model = {self.d_model} leaving an even number of channels per head")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple: aligned matmul shapes run faster."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m


def pretrained_config(folder) -> MambaConfig:
    """The MambaConfig that a published checkpoint's config.json describes, in either layout (checkpoint.py)."""
    fields = checkpoint.read_pretrained_config(folder)
    try:
        return MambaConfig(**fields)
    except ValueError as e:
        raise checkpoint.PretrainedError(f"{folder}/config.json: {e}") from None


def param_count(config: MambaConfig) -> int:
    """Number of parameters of MambaLM(config), the tied embedding counted once."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank_value, config.d_conv
    c = config
    mixer = (d * (1 + c.gate) * di                                   # in_proj
             + di * k                                                # conv1d (one length-k filter per channel)
             + di * (r * c.selective_delta + n * c.selective_B + n * c.selective_C + r * c.selective_A)  # x_proj
             + r * di * c.selective_delta + di                       # dt_proj with its bias, or dt_bias alone
             + di * n * (2 - c.selective_B - c.selective_C)          # fixed B, C
             + (r * di + di) * c.selective_A                         # A_proj with its bias
             + di * n + di                                           # A_log, D
             + di * d)                                               # out_proj
    mixer += ((1 + c.gate) * di + d) * config.bias + di * config.conv_bias
    if config.layer == "mamba2":  # in_proj to z, x, B, C, dt; conv over x, B, C; dt_bias, A_log, D per head; norm
        h, conv = di // config.headdim, di + 2 * config.ngroups * n
        mixer = (d * (di + conv + h) + conv * k + 3 * h + di + di * d
                 + (di + conv + h + d) * config.bias + conv * config.conv_bias)
    embedding = config.padded_vocab_size * d
    lm_head = 0 if config.tie_embeddings else embedding
    return embedding + config.n_layer * (d + mixer) + d + lm_head
