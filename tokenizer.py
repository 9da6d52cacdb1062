"""Tokenizers: text <-> token ids, one class per kind, each saved as a small state dict in checkpoints.

    ByteTokenizer   one token per UTF-8 byte, vocabulary 256 (the default: nothing unknown, ever)
    CharTokenizer   one token per character of the corpus it was built on
    HFTokenizer     a tokenizer.json (GPT-NeoX's BPE of the published Mamba models), through `tokenizers`
    TaskTokenizer   the symbols of a synthetic task's ids (tasks.py), so an example prints as a string

``Tokenizer.from_state_dict`` is the one place that turns a saved state back into a tokenizer.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator

import numpy as np

import tasks


class Tokenizer:
    """Text <-> token ids. Subclasses set ``vocab_size`` and ``unit`` ("byte" or "char": what one
    token is, so the loss can be reported in bits per byte or per character)."""

    vocab_size: int
    unit: str

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        raise NotImplementedError

    def decode_pieces(self, ids) -> Iterator[str]:
        """The text of each token as soon as it can be printed (for streaming, and for labelling tokens),
        then what the end still holds: len(ids) + 1 pieces that join to decode(ids). Tokenizers whose
        tokens can split a character (bytes, byte-level BPE) hold its first parts back until it is whole."""
        for token in ids:
            yield self.decode([token])
        yield ""

    def state_dict(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def from_state_dict(state: dict) -> Tokenizer:
        if state.get("kind") == "byte":
            return ByteTokenizer()
        if state.get("kind") == "char":
            return CharTokenizer(state["chars"])
        if state.get("kind") == "hf":
            return HFTokenizer(state["json"])
        if state.get("kind") == "task":
            return TaskTokenizer(state["task"], state["vocab_size"])
        raise ValueError(f"unknown tokenizer state {state!r}")


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: no unknown symbols, and any text round-trips exactly."""

    vocab_size = 256
    unit = "byte"

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        # A sampled sequence may stop in the middle of a multi-byte character, or the model may
        # emit an invalid byte sequence: show U+FFFD rather than crash.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def decode_pieces(self, ids) -> Iterator[str]:
        # An incremental decoder prints U+FFFD for a sequence that can never be valid, as decode does.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in ids:
            yield decoder.decode(bytes([int(token)]))
        yield decoder.decode(b"", final=True)

    def state_dict(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of characters of the corpus."""

    unit = "char"

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("a char tokenizer needs at least one character")
        self.vocab_size = len(self.chars)
        # Sorted code points let encode_array map a whole string at once with searchsorted.
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.minimum(np.searchsorted(self._codes, points), self.vocab_size - 1)
        unknown = self._codes[ids] != points  # searchsorted gives the insertion point for a stranger
        if unknown.any():
            bad = chr(points[np.argmax(unknown)])
            raise ValueError(f"character {bad!r} (U+{ord(bad):04X}) is not in the char vocabulary "
                             f"({self.vocab_size} characters taken from the training corpus)")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def state_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer, from the text of its tokenizer.json: the GPT-NeoX BPE
    of the published Mamba models, for generating with them and fine-tuning them ([model] init_from).
    Needs the optional ``tokenizers`` package. No special tokens are added (no BOS/EOS), as
    transformers' GPT-NeoX tokenizer does not add any."""

    unit = "token"

    def __init__(self, json_text: str):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ValueError("a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        self.json_text = json_text
        self._backend = Backend.from_str(json_text)
        self.vocab_size = max(self._backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self._backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_pieces(self, ids) -> Iterator[str]:
        from tokenizers.decoders import DecodeStream  # holds back a byte-level token's partial character

        stream, seen, shown = DecodeStream(skip_special_tokens=False), [], ""
        for token in ids:
            seen.append(int(token))
            piece = stream.step(self._backend, int(token)) or ""
            shown += piece
            yield piece
        whole = self.decode(seen)  # what the stream still holds: a character cut off at the end
        yield whole[len(shown):] if whole.startswith(shown) else ""

    def state_dict(self) -> dict:
        return {"kind": "hf", "json": self.json_text}


class TaskTokenizer(Tokenizer):
    """A synthetic task's ids <-> the symbols tasks.py draws them with ("." noise, "|" marker, "*" trigger,
    letters for the rest), so that a task example prints and reads as a string."""

    unit = "token"

    def __init__(self, task, vocab_size):
        self.task, self.vocab_size = task, vocab_size
        letters = [chr(ord("a") + i) if i < 26 else chr(0x3B1 + i - 26) for i in range(vocab_size)]  # then α, β, ...
        if task == "selective_copying":  # ids NOISE, MARKER, then data
            self.symbols = ".|" + "".join(letters[:vocab_size - 2])
        else:  # ordinary ids, then the trigger
            self.symbols = "".join(letters[:tasks.trigger(vocab_size)]) + "*"

    def encode_array(self, text):
        unknown = set(text) - set(self.symbols)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]!r} is not a symbol of {self.task} (symbols: {self.symbols})")
        return np.array([self.symbols.index(c) for c in text], dtype=np.int64)

    def decode(self, ids):
        return "".join(self.symbols[int(i)] for i in ids)

    def state_dict(self):
        return {"kind": "task", "task": self.task, "vocab_size": self.vocab_size}

    def token_class(self, token_id):
        """What a token is for the task: noise, marker or data (Selective Copying); trigger or ordinary."""
        if self.task == "selective_copying":
            return {tasks.NOISE: "noise", tasks.MARKER: "marker"}.get(int(token_id), "data")
        return "trigger" if int(token_id) == tasks.trigger(self.vocab_size) else "ordinary"
