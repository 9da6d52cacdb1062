"""Published Mamba checkpoints: load them into MambaLM, save MambaLM so that transformers loads it.

    model = MambaLM.from_pretrained("state-spaces/mamba-130m-hf")   # or a local directory
    model.save_pretrained("my-mamba")                              # the Hugging Face layout
    python pretrained.py export --ckpt out/ckpt.pt --out my-mamba  # a training checkpoint, same layout

The published weights come in two layouts, told apart by their config.json:

  original (state-spaces/mamba-130m ... mamba-2.8b, written by mamba_ssm): d_model, n_layer, vocab_size,
      ssm_cfg {d_state, d_conv, expand, ...}, rms_norm, residual_in_fp32, fused_add_norm,
      pad_vocab_size_multiple, tie_embeddings; weights in pytorch_model.bin named exactly as in model.py
      (backbone.embedding, backbone.layers.N.mixer..., backbone.norm_f, lm_head). vocab_size is the
      tokenizer's (50277); the embedding has it rounded up to a multiple of pad_vocab_size_multiple rows
      (50280), as MambaConfig.padded_vocab_size does.
  Hugging Face (state-spaces/mamba-130m-hf ..., transformers.MambaForCausalLM): model_type "mamba",
      hidden_size, num_hidden_layers, state_size, expand, conv_kernel, time_step_rank, use_bias,
      use_conv_bias, layer_norm_epsilon, vocab_size, tie_word_embeddings; weights in model.safetensors
      (or pytorch_model.bin, or shards listed in a *.index.json), the embedding named backbone.embeddings.
      Here vocab_size already is the padded number of rows (50280); transformers samples among all of them.

residual_in_fp32 and fused_add_norm are how the official code runs, not what it computes in float32:
model.py always keeps the residual stream in float32, so both are read and ignored. Weights load into a
float32 model whatever dtype they were stored in.
"""
import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from data import HFTokenizer, Tokenizer
from model import MambaConfig, MambaLM

HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # org/name on the Hugging Face hub
TOKENIZER_STATE = "baby_mamba_tokenizer.json"  # a byte/char tokenizer's state, written by export
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # looked for in this order, as transformers does


class PretrainedError(ValueError):
    """A directory or hub name that cannot be loaded; the message is one line naming the file or keys."""


# ----------------------------------------------------------------------------------------------------
# Finding the files


def resolve(path) -> Path:
    """A local directory as is; a hub name (org/name, no such local directory) downloaded through
    huggingface_hub (config, tokenizer and one weight format) into its cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if not HUB_NAME.fullmatch(str(path)):
        raise PretrainedError(f"{path}: no such directory")
    manual = (f"or download config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json from "
              f"huggingface.co/{path} into a directory and pass its path")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"{path}: no such directory; to download it from the Hugging Face hub, "
                              f"pip install huggingface_hub, {manual}") from None
    try:
        folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
        if not any((folder / name).exists() for name in WEIGHT_FILES):  # the original layout has .bin only
            folder = Path(snapshot_download(path, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except Exception as e:  # offline, no such repository, ...
        reason = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise PretrainedError(f"{path}: no such directory, and downloading it from the Hugging Face hub "
                              f"failed ({reason}); check the name and the network, {manual}") from None
    return folder


def read_config(folder) -> MambaConfig:
    """The MambaConfig that folder/config.json describes, in either layout."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{path}: no such file; a pretrained directory needs its config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    try:
        if config.get("model_type") == "mamba" or "hidden_size" in config:
            return _from_hf_config(config)
        if "d_model" in config:
            return _from_original_config(config)
        raise ValueError(f"neither the original Mamba layout (d_model, n_layer, ...) nor the Hugging Face "
                         f"one (model_type mamba); model_type is {config.get('model_type')!r}")
    except KeyError as e:
        raise PretrainedError(f"{path}: no key {e}") from None
    except ValueError as e:  # an unsupported variant, or a value MambaConfig refuses
        raise PretrainedError(f"{path}: {e}") from None


def _from_original_config(c: dict) -> MambaConfig:
    """mamba_ssm's MambaConfig (mixer_seq_simple.MambaLMHeadModel) -> ours."""
    ssm = c.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"ssm_cfg layer {ssm['layer']!r}: only Mamba1 blocks are implemented here")
    if not c.get("rms_norm", True):
        raise ValueError("rms_norm is false: only RMSNorm models are implemented here")
    if c.get("d_intermediate") or c.get("attn_layer_idx"):
        raise ValueError("d_intermediate / attn_layer_idx: hybrid models with MLPs or attention are not supported")
    return MambaConfig(d_model=c["d_model"], n_layer=c["n_layer"], vocab_size=c["vocab_size"],
                       d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
                       dt_rank=ssm.get("dt_rank", "auto"), dt_min=ssm.get("dt_min", 0.001),
                       dt_max=ssm.get("dt_max", 0.1), dt_init_floor=ssm.get("dt_init_floor", 1e-4),
                       dt_scale=ssm.get("dt_scale", 1.0), conv_bias=ssm.get("conv_bias", True),
                       bias=ssm.get("bias", False), pad_vocab_size_multiple=c.get("pad_vocab_size_multiple", 8),
                       tie_embeddings=c.get("tie_embeddings", True))


def _from_hf_config(c: dict) -> MambaConfig:
    """transformers' MambaConfig -> ours. Its vocab_size counts the embedding's rows, padding included;
    ours counts real token ids, so without an unpadded_vocab_size (written by save_pretrained) every row
    is a token, as transformers has it."""
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {c['hidden_act']!r}: the Mamba block here uses silu")
    rows = c["vocab_size"]
    padded = "unpadded_vocab_size" in c
    return MambaConfig(d_model=c["hidden_size"], n_layer=c["num_hidden_layers"],
                       vocab_size=c["unpadded_vocab_size"] if padded else rows,
                       pad_vocab_size_multiple=c.get("pad_vocab_size_multiple", 1) if padded else 1,
                       d_state=c.get("state_size", 16), d_conv=c.get("conv_kernel", 4), expand=c.get("expand", 2),
                       dt_rank=c.get("time_step_rank", "auto"), dt_min=c.get("time_step_min", 0.001),
                       dt_max=c.get("time_step_max", 0.1), dt_init_floor=c.get("time_step_floor", 1e-4),
                       dt_scale=c.get("time_step_scale", 1.0), conv_bias=c.get("use_conv_bias", True),
                       bias=c.get("use_bias", False), norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=c.get("tie_word_embeddings", True))


def read_tokenizer(folder) -> Tokenizer:
    """folder/tokenizer.json through the tokenizers package, else the byte/char tokenizer that export
    wrote as baby_mamba_tokenizer.json."""
    folder = Path(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            return HFTokenizer((folder / "tokenizer.json").read_text(encoding="utf-8"))
        if (folder / TOKENIZER_STATE).is_file():
            return Tokenizer.from_state_dict(json.loads((folder / TOKENIZER_STATE).read_text(encoding="utf-8")))
    except Exception as e:  # tokenizers missing, or a file it cannot parse
        raise PretrainedError(f"{folder}: cannot read its tokenizer ({str(e).splitlines()[0][:200]})") from None
    raise PretrainedError(f"{folder / 'tokenizer.json'}: no such file; the original-layout checkpoints have none: "
                          f"put GPT-NeoX's (EleutherAI/gpt-neox-20b) tokenizer.json there, or use the -hf model")


# ----------------------------------------------------------------------------------------------------
# Loading


def _read_file(path: Path) -> dict:
    """The tensors of one weight file, on the CPU."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as read
        except ImportError:
            raise PretrainedError(f"{path} needs the safetensors package: pip install safetensors") from None
    else:  # weights_only: tensors and plain containers, never code
        def read(p):
            return torch.load(p, map_location="cpu", weights_only=True)
    try:
        return read(path)
    except Exception as e:  # truncated, corrupt, or a pickle that holds more than tensors
        raise PretrainedError(f"{path}: not a readable weight file ({str(e).splitlines()[0][:150]})") from None


def _read_weights(folder: Path) -> tuple[dict, str]:
    """(state dict on the CPU, the file it came from) of the first weight format found."""
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise PretrainedError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")
    files = [name]
    if name.endswith(".index.json"):  # shards: {"weight_map": {tensor name: file}}
        try:
            files = sorted(set(json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise PretrainedError(f"{folder / name}: not a readable shard index ({e!r})") from None
    state = {}
    for file in files:
        state.update(_read_file(folder / file))
    return state, str(folder / name)


def _names(keys, limit=4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: MambaLM, folder) -> None:
    """Copy folder's weights into model (any dtype, converted to the model's), after checking that the
    names and shapes are exactly those model's config implies."""
    state, source = _read_weights(Path(folder))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}
    if model.config.tie_embeddings:  # one matrix: the original layout stores it twice, transformers once
        state.pop("lm_head.weight", None)
        if "backbone.embedding.weight" in state:
            state["lm_head.weight"] = state["backbone.embedding.weight"]
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise PretrainedError(f"{source} does not match its config.json: " + "; ".join(
            f"{what} {_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise PretrainedError(f"{source} does not match its config.json: " + ", ".join(
            f"{k} is {tuple(state[k].shape)}, the config needs {tuple(expected[k].shape)}" for k in wrong[:3])
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    model.load_state_dict(state)


def load_pretrained(path) -> MambaLM:
    """A published (or saved) Mamba from a local directory or a hub name, in eval mode on the CPU."""
    folder = resolve(path)
    model = MambaLM(read_config(folder))
    load_weights(model, folder)
    return model.eval()


def init_config(model_cfg: MambaConfig) -> tuple[MambaConfig, Tokenizer]:
    """For [model] init_from: the pretrained architecture (keeping this config's scan and init_from)
    and the pretrained tokenizer, which the training data is then encoded with."""
    folder = resolve(model_cfg.init_from)
    config, tokenizer = read_config(folder), read_tokenizer(folder)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise PretrainedError(f"{folder}: its tokenizer has {tokenizer.vocab_size} ids, more than the "
                              f"{config.padded_vocab_size} rows of the embedding")
    return replace(config, scan=model_cfg.scan, init_from=model_cfg.init_from), tokenizer


# ----------------------------------------------------------------------------------------------------
# Saving, in the Hugging Face layout


def hf_config(config: MambaConfig, dtype: torch.dtype) -> dict:
    """transformers' config.json for a model of this config. vocab_size is the number of embedding
    rows; unpadded_vocab_size and pad_vocab_size_multiple (ignored by transformers) bring ours back."""
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba",
            "vocab_size": config.padded_vocab_size, "unpadded_vocab_size": config.vocab_size,
            "pad_vocab_size_multiple": config.pad_vocab_size_multiple, "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer, "state_size": config.d_state, "expand": config.expand,
            "intermediate_size": config.d_inner, "conv_kernel": config.d_conv,
            "time_step_rank": config.dt_rank_value, "use_bias": config.bias, "use_conv_bias": config.conv_bias,
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
            "hidden_act": "silu", "residual_in_fp32": True, "time_step_min": config.dt_min,
            "time_step_max": config.dt_max, "time_step_floor": config.dt_init_floor,
            "time_step_scale": config.dt_scale, "dtype": str(dtype).removeprefix("torch.")}


def save_pretrained(model: MambaLM, directory) -> Path:
    """Write config.json and model.safetensors (pytorch_model.bin without the safetensors package) in
    the layout transformers.MambaForCausalLM.from_pretrained reads. Returns the weight file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; transformers ties it again
    config = hf_config(model.config, model.lm_head.weight.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, directory / "pytorch_model.bin")
        return directory / "pytorch_model.bin"
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory / "model.safetensors"


def export(ckpt_path, out_dir) -> None:
    """A training checkpoint -> out_dir in the Hugging Face layout, with its tokenizer: tokenizer.json
    for a model fine-tuned from one, else baby_mamba_tokenizer.json (a byte or char tokenizer is no
    Hugging Face tokenizer; generate.py --pretrained and init_from read that file)."""

    model, tokenizer, ckpt = load_checkpoint(ckpt_path)
    weights = save_pretrained(model, out_dir)
    state = tokenizer.state_dict()
    if state["kind"] == "hf":
        (Path(out_dir) / "tokenizer.json").write_text(state["json"], encoding="utf-8")
        written = "tokenizer.json"
    else:
        (Path(out_dir) / TOKENIZER_STATE).write_text(json.dumps(state) + "\n", encoding="utf-8")
        written = TOKENIZER_STATE
    print(f"wrote {Path(out_dir) / 'config.json'}, {weights} and {Path(out_dir) / written} "
          f"(step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrained Mamba checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write a training checkpoint in the Hugging Face layout")
    ex.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by main.py (default: out/ckpt.pt)")
    ex.add_argument("--out", required=True, help="directory to write config.json, the weights and the tokenizer to")
    args = parser.parse_args(argv)
    export(args.ckpt, args.out)


if __name__ == "__main__":
    main()
