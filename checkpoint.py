"""Checkpoints: one file of plain containers and tensors, so torch.load(weights_only=True) reads it
and a file that smuggles in code (any other pickled object) is refused instead of run.

train.py writes them (what a checkpoint holds is listed there); generate.py, look_inside.py and
pretrained.py read them through load_checkpoint. Every failure is one line and exit status 2.
"""
import hashlib
import os
import pickle
import sys
from pathlib import Path

import torch

from data import Tokenizer
from model import MambaConfig, MambaLM

CKPT_FORMAT = "baby_mamba/1"  # marks a file as ours; bump when the checkpoint layout changes


def die(message: str, status: int = 2):
    """Stop the program with one line on stderr and no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


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


def read_checkpoint(path) -> dict:
    """The checkpoint dict at ``path`` (tensors on the CPU), or exit with one line saying why not."""
    hint = "pass the path to a file written by main.py"
    if not Path(path).is_file():
        die(f"{path}: no such checkpoint file; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holds objects other than tensors and containers
        die(f"{path} is not a readable checkpoint ({_load_error(e)}); {hint}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        die(f"{path} is not a baby_mamba checkpoint (no format = {CKPT_FORMAT!r}); {hint}")
    return ckpt


def _load_error(e: Exception) -> str:
    """The informative sentence of a torch.load error (they run to several paragraphs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
    prefix = "weights_only refused it: " if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: "
    return prefix + detail.split(". ")[0][:150].rstrip(".")


def load_checkpoint(path, map_location="cpu"):
    """(model in eval mode on ``map_location``, tokenizer, checkpoint dict) from a file written by train."""
    ckpt = read_checkpoint(path)
    model = MambaLM(MambaConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt


def model_fingerprint(state_dict: dict) -> str:
    """SHA-256 of every tensor's bytes: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
