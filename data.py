"""Data: a corpus of text, its cached token stream, and the training batches (text windows or task examples).

The pipeline, in the order it runs:

1. A *source* names the text: the built-in offline corpus ``"stdlib"``, a ``.txt`` file, a folder of
   ``.txt`` files, or a URL (``http(s)://`` or ``file://``) that is downloaded once into ``cache_dir``.
   "stdlib" needs no network and is the same for a given Python version: pydoc's topic help (the
   language reference as text, ~0.5 MB) followed by every top-level module of the standard library
   (``lib/pythonX.Y/*.py`` sorted by name, ~4.7 MB), capped at STDLIB_MAX_BYTES; 5.2 MB on 3.11.
2. The text is read as a stream of pieces (never all at once), encoded by a tokenizer (tokenizer.py:
   bytes by default, characters optionally) and written once to ``cache_dir/<tokenizer>-<key>/`` as
   ``train.bin``, ``val.bin`` and ``meta.json``. The key hashes the source's identity (paths, sizes
   and mtimes, or the URL), the tokenizer kind and the split, so a changed source never reuses a
   stale cache.
3. Training reads the two ``np.memmap`` files through ``get_batch``: random contiguous windows, so a
   corpus larger than memory works and only the sampled windows are ever paged in.

The last ``val_fraction`` of the stream is the validation split (a contiguous tail, not a random
sample, so no training window overlaps validation text).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import tasks
from config import FRACTION, NOT_BLANK, POSITIVE, check_fields, option
from tokenizer import ByteTokenizer, CharTokenizer, Tokenizer

CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are rebuilt
STDLIB_MAX_BYTES = 8 * 2**20  # cap on the built-in corpus; ~5.2 MB on CPython 3.11, under the cap
CHUNK_CHARS = 2**20  # large files are read and encoded one million characters at a time


class DataError(ValueError):
    """A problem with the data source (missing, empty, unreadable, too short). One clear line."""


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens (the ``[data]`` section of config.ini)."""

    source: str = option("stdlib", (
        "stdlib (offline corpus: pydoc topics + the standard library's top-level .py files), "
        "a .txt file, a folder of .txt files (recursive, sorted by path), or an http(s)/file URL "
        "downloaded once"), NOT_BLANK)
    tokenizer: Literal["byte", "char"] = option("byte", (
        "byte: UTF-8 bytes, vocabulary 256; char: the corpus's distinct characters"))
    cache_dir: str = option("data_cache", (
        "folder for downloads and the encoded token cache (train.bin, val.bin, meta.json)"))
    val_fraction: float = option(0.05, "fraction of the token stream, taken from its end, held out for validation",
                                 FRACTION)
    task: Literal["none", "selective_copying", "induction_heads"] = option("none", (
        "none: train on the text above; else a synthetic task of the paper's section 4.1, generated on the fly "
        "(tasks.py; source, tokenizer and val_fraction are then unused)"))
    task_vocab: int = option(16, "a task's vocabulary size, special tokens included", POSITIVE)
    task_tokens: int = option(16, "selective_copying: data tokens to copy (K)", POSITIVE)
    task_targets: Literal["answers", "every"] = option("answers", (
        "what a task's training loss scores: answers: the answers alone; every: also the next token at every "
        "other position, as in the H3/safari code the paper's tasks come from (validation scores the answers)"))

    def __post_init__(self):
        check_fields(self)


# ----------------------------------------------------------------------------------------------------
# Sources: each is an identity (for the cache key) and a function returning a fresh iterator of text
# pieces, so the corpus can be streamed twice (count, then write) without being held in memory.


def _stdlib_files() -> list[Path]:
    """The standard library's top-level modules (lib/pythonX.Y/*.py), sorted by name. Packages and
    the test suite are left out: distributions split those off, the top-level modules always ship."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"), key=lambda p: p.name)


def _stdlib_pieces() -> Iterator[str]:
    """pydoc's topic help (the language reference as plain text, in sorted topic order), then each
    top-level stdlib module behind a one-line header, stopping at STDLIB_MAX_BYTES of UTF-8."""
    from pydoc_data.topics import topics

    budget = STDLIB_MAX_BYTES
    docs = (topics[name] for name in sorted(topics))
    modules = (f"# {path.name}\n{path.read_text(encoding='utf-8', errors='replace')}\n"
               for path in _stdlib_files())
    for piece in (*docs, *modules):
        encoded = piece.encode("utf-8")
        if len(encoded) >= budget:
            yield encoded[:budget].decode("utf-8", errors="ignore")  # never split a character
            return
        budget -= len(encoded)
        yield piece


def _file_pieces(paths: list[Path]) -> Callable[[], Iterator[str]]:
    """The files' text, concatenated as is, read CHUNK_CHARS characters at a time. newline=""
    keeps "\\r\\n" exactly, so the byte tokens are the file's bytes."""

    def pieces():
        for path in paths:
            try:
                with open(path, encoding="utf-8", newline="") as f:
                    while chunk := f.read(CHUNK_CHARS):
                        yield chunk
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None

    return pieces


def _download(url: str, cache_dir: Path) -> Path:
    """Fetch ``url`` into cache_dir/downloads once (temp file then rename, so an interrupted
    download never looks complete); later calls reuse the file without touching the network."""
    name = re.sub(r"[^\w.-]", "_", urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])[-64:]
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / "downloads" / f"{digest}-{name or 'download'}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    return target


def _resolve_source(cfg: DataConfig) -> tuple[dict, Callable[[], Iterator[str]]]:
    """(identity, pieces): identity is a JSON-able description that changes whenever the text may."""
    src = cfg.source
    if src == "stdlib":
        files = [[p.name, p.stat().st_size] for p in _stdlib_files()]
        return {"stdlib": sys.version, "files": files, "cap": STDLIB_MAX_BYTES}, _stdlib_pieces
    if "://" in src and urllib.parse.urlsplit(src).scheme.lower() in ("http", "https", "file"):
        # A URL is assumed immutable: it is downloaded once and then identified by the URL alone.
        return {"url": src}, _file_pieces([_download(src, Path(cfg.cache_dir))])
    path = Path(src).expanduser().resolve()
    if path.is_file():
        paths = [path]
    elif path.is_dir():
        paths = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        if not paths:
            raise DataError(f"source folder {src} contains no .txt files")
    else:
        raise DataError(f"source {src!r} is not stdlib, a URL, or an existing file or folder")
    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    return {"files": files}, _file_pieces(paths)


# ----------------------------------------------------------------------------------------------------
# The token cache


@dataclass
class Dataset:
    """The encoded corpus: 1-D memmaps of token ids and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer


def _dtype_for(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every id: one byte per token for bytes."""
    return "uint8" if vocab_size <= 2**8 else "uint16" if vocab_size <= 2**16 else "uint32"


def _build(folder: Path, cfg: DataConfig, identity: dict, pieces, tokenizer: Tokenizer | None) -> None:
    """Encode the corpus into a temporary folder, then rename it to ``folder`` in one step, so a
    reader sees either no cache or a complete one (also when several processes build at once).
    ``tokenizer``: a given one (a pretrained model's), else the kind cfg.tokenizer names."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        # Pass 1: count the tokens (the split point depends on the total) and collect the charset.
        n_tokens, charset = 0, set()
        for piece in pieces():
            if tokenizer is not None:
                try:
                    n_tokens += len(tokenizer.encode_array(piece))
                except ValueError as e:  # a character a given char tokenizer does not know
                    raise DataError(f"source {cfg.source!r}: {e}") from None
            elif cfg.tokenizer == "char":
                charset.update(piece)
                n_tokens += len(piece)
            else:
                n_tokens += len(piece.encode("utf-8"))
        if n_tokens < 2:
            raise DataError(f"corpus from source {cfg.source!r} is empty")
        if tokenizer is None:
            tokenizer = CharTokenizer(charset) if cfg.tokenizer == "char" else ByteTokenizer()
        n_val = min(max(1, round(n_tokens * cfg.val_fraction)), n_tokens - 1)
        n_train = n_tokens - n_val
        dtype = _dtype_for(tokenizer.vocab_size)

        # Pass 2: encode piece by piece; the first n_train tokens go to train.bin, the rest to val.bin.
        written = 0
        with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f:
            for piece in pieces():
                ids = tokenizer.encode_array(piece).astype(dtype)
                cut = min(max(n_train - written, 0), len(ids))
                ids[:cut].tofile(train_f)
                ids[cut:].tofile(val_f)
                written += len(ids)
        if written != n_tokens:
            raise DataError(f"source {cfg.source!r} changed while it was being read; try again")

        meta = {"format": CACHE_FORMAT, "source": cfg.source, "identity": identity,
                "tokenizer": tokenizer.state_dict(), "dtype": dtype,
                "n_train": n_train, "n_val": n_val, "val_fraction": cfg.val_fraction}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_dataset(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Dataset:
    """Build the token cache for ``cfg`` if it is missing, then open it as memmaps. A given
    ``tokenizer`` (a pretrained model's: [model] init_from) replaces cfg.tokenizer."""
    identity, pieces = _resolve_source(cfg)
    kind = cfg.tokenizer if tokenizer is None else tokenizer.state_dict()["kind"]
    key_material = {"format": CACHE_FORMAT, "identity": identity, "val_fraction": cfg.val_fraction,
                    "tokenizer": cfg.tokenizer if tokenizer is None else tokenizer.state_dict()}
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cfg.cache_dir) / f"{kind}-{key}"
    if not (folder / "meta.json").exists():
        _build(folder, cfg, identity, pieces, tokenizer)
    meta = json.loads((folder / "meta.json").read_text())
    train = np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_train"],))
    val = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_val"],))
    return Dataset(train, val, Tokenizer.from_state_dict(meta["tokenizer"]))


# ----------------------------------------------------------------------------------------------------
# Batches


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random contiguous windows of ``seq_len + 1`` tokens: x = window[:-1] and
    y = window[1:] (the next token at every position), both int64 (b, l).

    Start offsets come from ``torch.randint(generator=...)``, so the batches are a function of the
    generator's state alone: saving ``generator.get_state()`` in a checkpoint restores the data
    position exactly.
    """
    if len(tokens) < seq_len + 1:
        raise DataError(f"a split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "use a longer corpus, a smaller seq_len or a larger val_fraction")
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator).numpy()
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)  # (b, l+1)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class Batches:
    """Where the trainer's batches come from: random windows of the text's two splits (``dataset``), or,
    for a synthetic task (``dataset`` None), fresh examples of [data] task. Both give (x, y) int64 (b, l):
    y is the next token at every position, or a task's answers with IGNORE elsewhere."""

    def __init__(self, cfg: DataConfig, dataset: Dataset | None, batch_size: int, seq_len: int):
        self.cfg, self.dataset, self.batch_size, self.seq_len = cfg, dataset, batch_size, seq_len

    def _draw(self, split: str, generator: torch.Generator):
        if self.dataset is None:
            x, y = tasks.make_batch(self.cfg.task, self.cfg.task_vocab, self.cfg.task_tokens, self.batch_size,
                                    self.seq_len, generator)
            if split == "train" and self.cfg.task_targets == "every":
                y = tasks.every_position(x, y)
            return x, y
        return get_batch(getattr(self.dataset, split), self.batch_size, self.seq_len, generator)

    def train(self, generator: torch.Generator):
        """One training micro-batch; a function of the generator's state alone (exact resume)."""
        return self._draw("train", generator)

    def validation(self, n: int, seed: int) -> list:
        """The fixed validation set every evaluation uses: ``n`` batches drawn once from a generator seeded
        with ``seed``, so successive evaluations (and resumed runs) measure the same examples. Text windows
        come from the validation split; task examples from a stream apart from the training ones, which are
        seeded seed + rank (CPU generators keep 32 bits of a seed: the offset must be smaller than that)."""
        generator = torch.Generator().manual_seed(seed + 999_983 * (self.dataset is None))
        return [self._draw("val", generator) for _ in range(n)]

    def __str__(self):
        if self.dataset is None:
            return f"task {self.cfg.task}, fresh examples every step"
        unit = self.dataset.tokenizer.unit
        return f"{len(self.dataset.train):,} train and {len(self.dataset.val):,} val {unit}s"
