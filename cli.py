"""What every command here shares: the one-line error exit, the device rule, and reading inputs.

The project's rule for bad input: one line on stderr saying what is wrong and how to fix it, exit status
2, no traceback (``die``). main.py, generate.py, look_inside.py, evaluate.py and pretrained.py all use it.
"""
import sys

import torch


def die(message: str, status: int = 2):
    """Stop the program with one line on stderr and no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def pick_device(name: str, where: str) -> torch.device:
    """"auto": CUDA when torch sees a GPU, else Apple's MPS, else the CPU; asking for a device torch does not
    see is a one-line error naming ``where`` the choice was made ("--device", "[training] device =")."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind, ok in available.items() if ok)
    if not available[name]:
        die(f"{where} {name}, but torch sees no {name.upper()} device; use auto or cpu")
    return torch.device(name)


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of ``path`` exactly as stored (newline="" keeps "\\r\\n"), or die naming ``flag``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"{flag} {path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})")


def encode(tokenizer, text: str, what: str) -> list[int]:
    """tokenizer.encode(text), or die naming ``what`` the text is when it has a character the tokenizer does not
    know (a char tokenizer's) or encodes to no token at all."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        die(f"{what}: {e}")
    if not ids:
        die(f"{what} is empty or encodes to no tokens; the model needs at least one token to read")
    return ids


def int_list(text: str, flag: str) -> list[int]:
    """"64,128,256" -> [64, 128, 256], or die naming ``flag``."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        die(f"{flag} must be comma-separated integers, got {text!r}")
