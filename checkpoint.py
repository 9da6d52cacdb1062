"""Checkpoint files, ours and the published ones, as plain dicts and tensors: nothing here builds a model.

Ours (written by train.py) are one file of plain containers and tensors, so torch.load(weights_only=True)
reads it and a file that smuggles in code (any other pickled object) is refused instead of run; it is
written atomically, so a crash never leaves half a file.

The published Mamba weights come in two layouts, told apart by their config.json:

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
model.py always keeps the residual stream in float32, so both are read and ignored. ``read_pretrained``
turns either layout into MambaConfig's fields and model.py's parameter names; ``write_pretrained`` writes
the Hugging Face layout. model.py's MambaLM.from_pretrained and save_pretrained are built on them.
"""
import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path

import torch

from cli import die

CKPT_FORMAT = "baby_mamba/1"  # marks a file as ours; bump when the checkpoint layout changes
STATE_FORMAT = "baby_mamba/state-1"  # an inference state (generate.py --save-state)
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # org/name on the Hugging Face hub
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # looked for in this order, as transformers does


class PretrainedError(ValueError):
    """A directory or hub name that cannot be loaded; the message is one line naming the file or keys."""


# ----------------------------------------------------------------------------------------------------
# Ours: training checkpoints


def save_checkpoint(ckpt: dict, path) -> None:
    """Write ``ckpt`` to ``path`` atomically: a temp file in the same folder, fsync, then rename. A
    crash or a failed write at any point leaves the previous file as it was, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename stays atomic
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)


def _read(path, marker: str, what: str, hint: str) -> dict:
    """The dict a file of ours holds (tensors on the CPU), or exit with one line saying why not."""
    if not Path(path).is_file():
        die(f"{path}: no such {what} file; {hint}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holds objects other than tensors and containers
        die(f"{path} is not a readable {what} ({_load_error(e)}); {hint}")
    if not isinstance(data, dict) or data.get("format") != marker:
        die(f"{path} is not a baby_mamba {what} (no format = {marker!r}); {hint}")
    return data


def read_checkpoint(path) -> dict:
    """The checkpoint dict at ``path`` (tensors on the CPU), or exit with one line saying why not."""
    ckpt = _read(path, CKPT_FORMAT, "checkpoint", "pass the path to a file written by main.py")
    # Files written before init_from moved from [model] to [training], and with their unused keys, still load.
    config = ckpt.get("config", {})
    if "init_from" in config.get("model", {}):
        config.setdefault("training", {})["init_from"] = config["model"].pop("init_from")
    for unused in ("world_size", "replicas"):
        ckpt.pop(unused, None)
    ckpt.get("metrics", {}).pop("best_val_loss", None)
    return ckpt


def save_state(path, config: dict, cache: list, tokens, attention_mask, generator_state) -> None:
    """An inference state (generate.py --save-state), atomically: what the model has read (its cache, which has
    read every token but the last), the tokens so far (b, T) with their mask, the sampler's generator, and the
    model's config, so that it is never continued with another model."""
    save_checkpoint({"format": STATE_FORMAT, "config": config, "tokens": tokens.cpu(),
                     "attention_mask": attention_mask.cpu(), "generator": generator_state,
                     "cache": [type(layer)(t.cpu() for t in layer) for layer in cache]}, path)


def read_state(path, config: dict, device) -> dict:
    """The state save_state wrote, on ``device``; exits with one line when it is not one or another model's."""
    state = _read(path, STATE_FORMAT, "state", "pass a file written by generate.py --save-state")
    theirs = state["config"]
    for key, value in config.items():
        if theirs.get(key) != value:
            die(f"{path} was written by another model ([model] {key} = {theirs.get(key)} there, {value} here)")
    # per layer as allocate_cache made it: a (conv, ssm) tuple for Mamba, a list for the Transformer's KV cache
    state["cache"] = [type(layer)(t.to(device) for t in layer) for layer in state["cache"]]
    state["tokens"], state["attention_mask"] = state["tokens"].to(device), state["attention_mask"].to(device)
    return state


def _load_error(e: Exception) -> str:
    """The informative sentence of a torch.load error (they run to several paragraphs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
    prefix = "weights_only refused it: " if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: "
    return prefix + detail.split(". ")[0][:150].rstrip(".")


def model_fingerprint(state_dict: dict) -> str:
    """SHA-256 of every tensor's bytes: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Published: finding the files


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
        from huggingface_hub import snapshot_download  # optional: only hub names need it
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


# ----------------------------------------------------------------------------------------------------
# Published: config.json <-> MambaConfig's fields


def read_pretrained_config(folder) -> dict:
    """MambaConfig's fields from folder/config.json, in either layout."""
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
        if config.get("model_type") == "mamba2":
            return _from_hf_mamba2_config(config)
        if config.get("model_type") == "mamba" or "hidden_size" in config:
            return _from_hf_config(config)
        if "d_model" in config:
            return _from_original_config(config)
        raise ValueError(f"neither the original Mamba layout (d_model, n_layer, ...) nor the Hugging Face "
                         f"one (model_type mamba or mamba2); model_type is {config.get('model_type')!r}")
    except KeyError as e:
        raise PretrainedError(f"{path}: no key {e}") from None
    except ValueError as e:  # an unsupported variant
        raise PretrainedError(f"{path}: {e}") from None


def _from_original_config(c: dict) -> dict:
    """mamba_ssm's MambaConfig (mixer_seq_simple.MambaLMHeadModel) -> our fields; ssm_cfg layer Mamba1 or Mamba2."""
    ssm = c.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") not in ("Mamba1", "Mamba2"):
        raise ValueError(f"ssm_cfg layer {ssm['layer']!r}: only Mamba1 and Mamba2 blocks are implemented here")
    if not c.get("rms_norm", True):
        raise ValueError("rms_norm is false: only RMSNorm models are implemented here")
    if c.get("d_intermediate") or c.get("attn_layer_idx"):
        raise ValueError("d_intermediate / attn_layer_idx: hybrid models with MLPs or attention are not supported")
    if ssm.get("layer") == "Mamba2":
        for key, official in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False),
                              ("dt_limit", [0.0, math.inf]), ("d_ssm", None)):
            if ssm.get(key, official) != official:
                raise ValueError(f"ssm_cfg {key} = {ssm[key]}: only the official default ({official}) is implemented")
        return {"d_model": c["d_model"], "n_layer": c["n_layer"], "vocab_size": c["vocab_size"], "layer": "mamba2",
                "d_state": ssm.get("d_state", 128), "d_conv": ssm.get("d_conv", 4), "expand": ssm.get("expand", 2),
                "headdim": ssm.get("headdim", 64), "ngroups": ssm.get("ngroups", 1),
                "chunk_size": ssm.get("chunk_size", 256), "dt_min": ssm.get("dt_min", 0.001),
                "dt_max": ssm.get("dt_max", 0.1), "dt_init_floor": ssm.get("dt_init_floor", 1e-4),
                "conv_bias": ssm.get("conv_bias", True), "bias": ssm.get("bias", False),
                "pad_vocab_size_multiple": c.get("pad_vocab_size_multiple", 8),
                "tie_embeddings": c.get("tie_embeddings", True)}
    return {"d_model": c["d_model"], "n_layer": c["n_layer"], "vocab_size": c["vocab_size"],
            "d_state": ssm.get("d_state", 16), "d_conv": ssm.get("d_conv", 4), "expand": ssm.get("expand", 2),
            "dt_rank": ssm.get("dt_rank", "auto"), "dt_min": ssm.get("dt_min", 0.001),
            "dt_max": ssm.get("dt_max", 0.1), "dt_init_floor": ssm.get("dt_init_floor", 1e-4),
            "dt_scale": ssm.get("dt_scale", 1.0), "conv_bias": ssm.get("conv_bias", True),
            "bias": ssm.get("bias", False), "pad_vocab_size_multiple": c.get("pad_vocab_size_multiple", 8),
            "tie_embeddings": c.get("tie_embeddings", True)}


def _from_hf_config(c: dict) -> dict:
    """transformers' MambaConfig -> our fields. Its vocab_size counts the embedding's rows, padding included;
    ours counts real token ids, so without an unpadded_vocab_size (written by write_pretrained) every row is
    a token, as transformers has it."""
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {c['hidden_act']!r}: the Mamba block here uses silu")
    padded = "unpadded_vocab_size" in c
    return {"d_model": c["hidden_size"], "n_layer": c["num_hidden_layers"],
            "vocab_size": c["unpadded_vocab_size"] if padded else c["vocab_size"],
            "pad_vocab_size_multiple": c.get("pad_vocab_size_multiple", 1) if padded else 1,
            "d_state": c.get("state_size", 16), "d_conv": c.get("conv_kernel", 4), "expand": c.get("expand", 2),
            "dt_rank": c.get("time_step_rank", "auto"), "dt_min": c.get("time_step_min", 0.001),
            "dt_max": c.get("time_step_max", 0.1), "dt_init_floor": c.get("time_step_floor", 1e-4),
            "dt_scale": c.get("time_step_scale", 1.0), "conv_bias": c.get("use_conv_bias", True),
            "bias": c.get("use_bias", False), "norm_eps": c.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": c.get("tie_word_embeddings", True)}


def _from_hf_mamba2_config(c: dict) -> dict:
    """transformers' Mamba2Config -> our fields (vocab_size as in _from_hf_config)."""
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {c['hidden_act']!r}: the Mamba-2 block here uses silu")
    if any(kind != "mamba" for kind in c.get("layer_types") or []):
        raise ValueError("layer_types has attention layers: hybrid models are not implemented here")
    # transformers 5 writes inf as {"__float__": "Infinity"}; json itself (and older versions) as Infinity
    limit = [float(v["__float__"]) if isinstance(v, dict) else v for v in c.get("time_step_limit", [0.0, math.inf])]
    if limit != [0.0, math.inf]:
        raise ValueError(f"time_step_limit {c['time_step_limit']}: only (0, inf) is implemented")
    if c["num_heads"] * c["head_dim"] != c.get("expand", 2) * c["hidden_size"]:
        raise ValueError(f"num_heads {c['num_heads']} x head_dim {c['head_dim']} is not expand x hidden_size")
    padded = "unpadded_vocab_size" in c
    return {"layer": "mamba2", "d_model": c["hidden_size"], "n_layer": c["num_hidden_layers"],
            "vocab_size": c["unpadded_vocab_size"] if padded else c["vocab_size"],
            "pad_vocab_size_multiple": c.get("pad_vocab_size_multiple", 1) if padded else 1,
            "d_state": c.get("state_size", 128), "d_conv": c.get("conv_kernel", 4), "expand": c.get("expand", 2),
            "headdim": c["head_dim"], "ngroups": c.get("n_groups", 1), "chunk_size": c.get("chunk_size", 256),
            "dt_min": c.get("time_step_min", 0.001), "dt_max": c.get("time_step_max", 0.1),
            "dt_init_floor": c.get("time_step_floor", 1e-4), "conv_bias": c.get("use_conv_bias", True),
            "bias": c.get("use_bias", False), "norm_eps": c.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": c.get("tie_word_embeddings", False)}


def hf_config(config, dtype: torch.dtype) -> dict:
    """transformers' config.json for a model of this MambaConfig. vocab_size is the number of embedding
    rows; unpadded_vocab_size and pad_vocab_size_multiple (ignored by transformers) bring ours back."""
    shared = {"vocab_size": config.padded_vocab_size, "unpadded_vocab_size": config.vocab_size,
              "pad_vocab_size_multiple": config.pad_vocab_size_multiple, "hidden_size": config.d_model,
              "num_hidden_layers": config.n_layer, "state_size": config.d_state, "expand": config.expand,
              "conv_kernel": config.d_conv, "use_bias": config.bias, "use_conv_bias": config.conv_bias,
              "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
              "hidden_act": "silu", "residual_in_fp32": True, "time_step_min": config.dt_min,
              "time_step_max": config.dt_max, "time_step_floor": config.dt_init_floor,
              "dtype": str(dtype).removeprefix("torch.")}
    if config.layer == "mamba2":
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **shared,
                "num_heads": config.d_inner // config.headdim, "head_dim": config.headdim,
                "n_groups": config.ngroups, "chunk_size": config.chunk_size, "time_step_limit": [0.0, math.inf]}
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **shared,
            "intermediate_size": config.d_inner, "time_step_rank": config.dt_rank_value,
            "time_step_scale": config.dt_scale}


# ----------------------------------------------------------------------------------------------------
# Published: the weights


def _read_file(path: Path) -> dict:
    """The tensors of one weight file, on the CPU."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as read  # optional: only .safetensors files need it
        except ImportError:
            raise PretrainedError(f"{path} needs the safetensors package: pip install safetensors") from None
    else:  # weights_only: tensors and plain containers, never code
        def read(p):
            return torch.load(p, map_location="cpu", weights_only=True)
    try:
        return read(path)
    except Exception as e:  # truncated, corrupt, or a pickle that holds more than tensors
        raise PretrainedError(f"{path}: not a readable weight file ({str(e).splitlines()[0][:150]})") from None


def _names(keys, limit=4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_pretrained_weights(folder, expected: dict, tie_embeddings: bool) -> dict:
    """folder's weights (the first format of WEIGHT_FILES found) under model.py's names, after checking that
    the names and shapes are exactly those of ``expected`` (the state dict of the model they are for)."""
    folder = Path(folder)
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
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}
    if tie_embeddings:  # one matrix: the original layout stores it twice, transformers once
        state.pop("lm_head.weight", None)
        if "backbone.embedding.weight" in state:
            state["lm_head.weight"] = state["backbone.embedding.weight"]
    source = folder / name
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise PretrainedError(f"{source} does not match its config.json: " + "; ".join(
            f"{what} {_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise PretrainedError(f"{source} does not match its config.json: " + ", ".join(
            f"{k} is {tuple(state[k].shape)}, the config needs {tuple(expected[k].shape)}" for k in wrong[:3])
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    return state


def write_pretrained(directory, config, state: dict) -> Path:
    """Write config.json and model.safetensors (pytorch_model.bin without the safetensors package) in the
    layout transformers.MambaForCausalLM.from_pretrained reads, for a model of this MambaConfig whose state
    dict is ``state``. Returns the weight file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = state["lm_head.weight"].dtype
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v.detach().cpu().contiguous()
             for k, v in state.items()}
    if config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; transformers ties it again
    (directory / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n", encoding="utf-8")
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(state, directory / "pytorch_model.bin")
        return directory / "pytorch_model.bin"
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory / "model.safetensors"
