"""mamba2.py: the Mamba-2 block equals transformers' independent Mamba2Mixer on copied weights (lengths that
are not a multiple of the chunk, groups, conv bias), continues from its cache (pieces == one pass == steps),
keeps left padding out of its state, and starts from the official initialisation."""
import math

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

from data import DataConfig
from look_inside import look_inside
from mamba2 import Mamba2Mixer
from mamba_config import MambaConfig, param_count
from model import MambaLM
from pretrained import export, load_checkpoint
from runs import train_run
from train import TrainConfig

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


# ---- Mamba-2 in the language model: [model] layer = mamba2 ---------------------------------------------------

def mamba2_lm(**overrides):
    torch.manual_seed(0)
    config = MambaConfig(**({"d_model": 64, "n_layer": 2, "vocab_size": 50, "layer": "mamba2", "d_state": 16,
                             "headdim": 16, "ngroups": 2, "chunk_size": 16} | overrides))
    return MambaLM(config).eval()


def test_a_mamba2_language_model_decodes_like_its_forward():
    model = mamba2_lm()
    assert isinstance(model.backbone.layers[0].mixer, Mamba2Mixer)
    assert model.num_params() == param_count(model.config)
    ids = torch.randint(50, (2, 41), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_cache(2)
    assert cache[0][0].shape == (2, 128 + 2 * 2 * 16, 4) and cache[0][1].shape == (2, 8, 16, 16)
    logits = [model.prefill(ids[:, :3], cache), model.prefill(ids[:, 3:20], cache)]
    logits += [model.step(ids[:, t], cache) for t in range(20, 41)]
    torch.testing.assert_close(torch.stack(logits[2:], dim=1), full[:, 20:], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits[1], full[:, 19], rtol=0, atol=1e-4)
    greedy = model.generate(ids[:, :5], 6, temperature=0)
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(greedy[:, t], model(greedy[:, :t])[:, -1, :50].argmax(-1))


def test_impossible_head_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="MambaConfig.headdim must be a divisor of d_inner = 128, got 48"):
        MambaConfig(d_model=64, layer="mamba2", headdim=48)
    with pytest.raises(ValueError, match="MambaConfig.ngroups must be a divisor of the 8 heads, got 3"):
        MambaConfig(d_model=64, layer="mamba2", headdim=16, ngroups=3)


def test_the_trainer_trains_a_mamba2_model(tmp_path, capsys):
    """The same trainer, nothing Mamba-2-specific in it: the loss of a tiny run falls; the checkpoint samples,
    exports to transformers' Mamba2 layout with the same logits, and look_inside.py reads its Δ per head."""
    data = DataConfig(task="selective_copying", task_vocab=5, task_tokens=2)
    cfg = TrainConfig(out_dir=str(tmp_path / "m2"), device="cpu", batch_size=16, seq_len=16, max_steps=30, lr=1e-2,
                      min_lr=1e-3, warmup_steps=5, eval_interval=30, eval_batches=2, ckpt_interval=30)
    metrics = train_run(MambaConfig(d_model=32, n_layer=2, layer="mamba2", d_state=8, headdim=16, chunk_size=8),
                        data, cfg)
    history = torch.load(tmp_path / "m2" / "ckpt.pt", weights_only=True)["metrics"]["history"]
    assert metrics["val_loss"] < history[0]["val_loss"] - 0.3
    capsys.readouterr()  # the run's progress
    model, tokenizer, _ = load_checkpoint(tmp_path / "m2" / "ckpt.pt")
    assert model.generate(torch.tensor([tokenizer.encode("..a.|")]), 3, temperature=0).shape == (1, 8)
    export(tmp_path / "m2" / "ckpt.pt", tmp_path / "hf")
    ids = torch.tensor([tokenizer.encode("..a.b.|")])
    with torch.no_grad():
        theirs = Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        torch.testing.assert_close(theirs, model(ids), rtol=1e-4, atol=1e-5)
    # look_inside.py: Δ per head, the one forward computes, recomputed here from the first layer's input
    result = look_inside(tmp_path / "m2" / "ckpt.pt", ids=ids[0].tolist(), out=tmp_path / "delta.png")
    layer = model.backbone.layers[0]
    with torch.no_grad():
        dt = layer.mixer.in_proj(layer.norm(model.backbone._embed(ids)))[0, :, -layer.mixer.nheads:]
    torch.testing.assert_close(result["layers"][0]["delta"], torch.nn.functional.softplus(dt + layer.mixer.dt_bias))
    assert result["layers"][0]["delta"].shape == (7, layer.mixer.nheads) and (tmp_path / "delta.png").is_file()
