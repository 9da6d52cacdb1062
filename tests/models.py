"""The small model and token ids that the model and sampling tests share."""
import torch

from mamba_config import MambaConfig
from model import MambaLM

VOCAB = 50  # padded to 56 by the default multiple of 8: the padding ids must never be sampled


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, d_conv=4) | overrides
    return MambaLM(MambaConfig(**kwargs)).eval()


def random_ids(b, l, seed=1):
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))
