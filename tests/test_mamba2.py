"""mamba2.py: the Mamba-2 block equals transformers' independent Mamba2Mixer on copied weights (lengths that
are not a multiple of the chunk, groups, conv bias), continues from its cache (pieces == one pass == steps),
keeps left padding out of its state, and starts from the official initialisation."""
import math

import pytest
import torch
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

from mamba2 import Mamba2Mixer

SIZES = dict(d_model=64, d_state=16, headdim=16, ngroups=2, chunk_size=16)  # 8 heads of 16 in d_inner 128


def ours(seed=0, **overrides):
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(**(SIZES | overrides)).eval()
    with torch.no_grad():  # weights loud enough that a mistake anywhere shows in the output
        mixer.in_proj.weight.mul_(3)
        mixer.conv1d.bias.normal_()
    return mixer


def fresh_cache(mixer, b):
    return torch.zeros(b, mixer.conv_dim, mixer.d_conv), torch.zeros(b, mixer.nheads, mixer.headdim, mixer.d_state)


def hidden(b, l, seed=1):
    return torch.randn(b, l, SIZES["d_model"], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("l", [1, 16, 37])
def test_equals_transformers_mamba2_mixer(l):
    mixer = ours()
    config = Mamba2Config(hidden_size=64, num_heads=8, head_dim=16, expand=2, state_size=16, n_groups=2,
                          chunk_size=16, conv_kernel=4, use_conv_bias=True, use_bias=False, num_hidden_layers=1,
                          layer_norm_epsilon=1e-5)
    theirs = HFMamba2Mixer(config, layer_idx=0).eval()
    theirs.load_state_dict(mixer.state_dict())  # the official names on both sides
    x = hidden(2, l)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pieces", [[1, 40], [3, 5, 33], [41]], ids=["1+40", "3+5+33", "41"])
def test_pieces_through_the_cache_equal_one_pass_and_steps(pieces):
    mixer, x = ours(), hidden(2, sum(pieces))

    with torch.no_grad():
        full = mixer(x)
        cache, start, outs = fresh_cache(mixer, 2), 0, []
        for n in pieces:
            outs.append(mixer(x[:, start:start + n], cache))
            start += n
        torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)
        stepped, (conv, ssm) = [], fresh_cache(mixer, 2)
        for t in range(x.shape[1]):
            stepped.append(mixer.step(x[:, t], conv, ssm))
        torch.testing.assert_close(torch.stack(stepped, dim=1), full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ssm, cache[1], rtol=1e-4, atol=1e-5)


def test_left_padding_stays_out_of_the_state():
    mixer, x = ours(), hidden(1, 20)
    padded = torch.cat([torch.randn(1, 7, 64), x], dim=1)
    mask = torch.tensor([[0] * 7 + [1] * 20])
    with torch.no_grad():
        alone = mixer(x)
        both = mixer(padded, fresh_cache(mixer, 1), mask)
    torch.testing.assert_close(both[:, 7:], alone, rtol=1e-4, atol=1e-5)


def test_official_initialisation():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(d_model=256, n_layer=4)  # the defaults: d_state 128, headdim 64, expand 2
    assert (mixer.nheads, mixer.headdim, mixer.d_state, mixer.chunk_size) == (8, 64, 128, 256)
    A = torch.exp(mixer.A_log)
    assert ((A >= 1) & (A <= 16)).all()  # A = -exp(A_log) uniform in [-16, -1]
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all() and torch.equal(mixer.D, torch.ones(8))
    bound = 1 / math.sqrt(512) / math.sqrt(4)  # nn.Linear's kaiming bound, then 1/sqrt(n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="whole number of heads of headdim 48"):
        Mamba2Mixer(d_model=256, headdim=48)
