"""Trained models from disk, with their tokenizers: our training checkpoints and the published Mamba checkpoints.

    model, tokenizer, ckpt = load_checkpoint("out/ckpt.pt")          # a checkpoint written by main.py
    model = load_pretrained("state-spaces/mamba-130m-hf")           # = MambaLM.from_pretrained: either layout
    tokenizer = read_tokenizer(folder)                              # its tokenizer.json
    python pretrained.py export --ckpt out/ckpt.pt --out my-mamba   # a training checkpoint, Hugging Face layout

The two published layouts and how their files map onto model.py are in checkpoint.py; model.py's
MambaLM.from_pretrained and save_pretrained read and write them. This module puts a model and its tokenizer
together, for the commands (generate.py, look_inside.py, evaluate.py) and for fine-tuning (main.py).
"""
import argparse
import json
from pathlib import Path

from checkpoint import PretrainedError, read_checkpoint, resolve
from cli import die
from mamba_config import MambaConfig, pretrained_config
from model import MambaLM
from tokenizer import HFTokenizer, Tokenizer
from transformer import TransformerLM

TOKENIZER_STATE = "baby_mamba_tokenizer.json"  # a byte/char tokenizer's state, written by export

read_config = pretrained_config  # the MambaConfig of a published directory


def build_model(config: MambaConfig):
    """The language model [model] describes: the Transformer baseline for layer = transformer, else Mamba
    (MambaLM, whose Block picks the Mamba-1 or Mamba-2 mixer)."""
    return TransformerLM(config) if config.layer == "transformer" else MambaLM(config)


def load_checkpoint(path, map_location="cpu"):
    """(model in eval mode on ``map_location``, tokenizer, checkpoint dict) from a file written by train.py;
    exits with one line when the file is not one."""
    ckpt = read_checkpoint(path)
    model = build_model(MambaConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt


def load_pretrained(path) -> MambaLM:
    """A published (or saved) Mamba from a local directory or a hub name, in eval mode on the CPU."""
    return MambaLM.from_pretrained(path)


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


def load_model(ckpt=None, pretrained=None, device="cpu"):
    """(model in eval mode on ``device``, tokenizer) of a training checkpoint, or of a published directory or
    hub name; the commands' one way in. Exits with one line naming the option when it cannot be loaded."""
    if pretrained is None:
        model, tokenizer, _ = load_checkpoint(ckpt, map_location=device)
        return model, tokenizer
    try:
        folder = resolve(pretrained)
        tokenizer = read_tokenizer(folder)  # first: a missing tokenizer fails before the weights load
        return load_pretrained(folder).to(device), tokenizer
    except PretrainedError as e:
        die(f"--pretrained {e}")


def _not_in_published_layout(config: MambaConfig) -> str:
    """What of this architecture transformers' Mamba and Mamba2 lack ("" when nothing)."""
    if config.layer == "transformer":
        return "it is the Transformer baseline ([model] layer = transformer)"
    if config.layer == "mamba1":
        changed = [f"{key} = {str(getattr(config, key)).lower()}" for key in
                   ("selective_delta", "selective_B", "selective_C", "gate") if not getattr(config, key)]
        changed += ["selective_A = true"] if config.selective_A else []
        if changed:
            return f"its [model] has {', '.join(changed)}"
    return ""


def export(ckpt_path, out_dir) -> None:
    """A training checkpoint -> out_dir in the Hugging Face layout, with its tokenizer: tokenizer.json
    for a model fine-tuned from one, else baby_mamba_tokenizer.json (a byte or char tokenizer is no
    Hugging Face tokenizer; generate.py --pretrained and init_from read that file)."""
    model, tokenizer, ckpt = load_checkpoint(ckpt_path)
    unpublishable = _not_in_published_layout(model.config)
    if unpublishable:
        die(f"{ckpt_path}: {unpublishable}, which the Hugging Face Mamba layouts "
            "cannot describe; only models of the published architecture can be exported")
    weights = model.save_pretrained(out_dir)
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
