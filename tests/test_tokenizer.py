"""tokenizer.py: every tokenizer round-trips, survives a weights_only checkpoint, and streams its pieces."""

import pytest
import torch

import tasks
from tokenizer import ByteTokenizer, CharTokenizer, TaskTokenizer, Tokenizer


def test_byte_tokenizer_round_trips_any_unicode_exactly(unicode_text):
    tok = ByteTokenizer()
    ids = tok.encode(unicode_text)
    assert ids == list(unicode_text.encode("utf-8"))  # the tokens are the UTF-8 bytes
    assert tok.vocab_size == 256 and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == unicode_text
    assert tok.decode(torch.tensor(ids)) == unicode_text


def test_byte_decode_of_a_cut_character_does_not_crash():
    cut = list("a😀".encode())[:3]  # 'a' and half of the emoji
    assert ByteTokenizer().decode(cut) == "a\ufffd"


def test_char_tokenizer_round_trip_and_unknown_character():
    corpus = "hello, wörld 😀\n"
    tok = CharTokenizer(corpus)
    assert tok.chars == "".join(sorted(set(corpus)))
    assert tok.vocab_size == len(set(corpus)) and tok.unit == "char"
    ids = tok.encode("wörld, hello 😀")
    assert ids == [tok.chars.index(c) for c in "wörld, hello 😀"]
    assert tok.decode(ids) == "wörld, hello 😀"
    with pytest.raises(ValueError, match=r"'Z' \(U\+005A\) is not in the char vocabulary"):
        tok.encode("helloZ")


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer("abc\u00e9")])
def test_tokenizer_state_dict_survives_a_weights_only_checkpoint(tok, tmp_path):
    torch.save({"tokenizer": tok.state_dict()}, tmp_path / "t.pt")
    state = torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"]
    back = Tokenizer.from_state_dict(state)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    assert back.decode(back.encode("abcé")) == "abcé"


# ----------------------------------------------------------------------------------------------------
# Sources and the cache


def test_task_tokenizer_round_trips_and_is_saved_in_checkpoints():
    """The symbols of tasks.py's docstring, one per id, and the kinds of token look_inside.py groups by."""
    for task in tasks.TASKS:
        tok = TaskTokenizer(task, 16)
        ids = list(range(16))
        assert tok.encode(tok.decode(ids)) == ids and len(set(tok.decode(ids))) == 16
        assert isinstance(Tokenizer.from_state_dict(tok.state_dict()), TaskTokenizer)
    assert TaskTokenizer("selective_copying", 4).decode([0, 1, 2, 3]) == ".|ab"
    assert TaskTokenizer("induction_heads", 4).decode([0, 1, 2, 3]) == "abc*"
    with pytest.raises(ValueError, match="not a symbol"):
        TaskTokenizer("induction_heads", 4).encode("abd")
    sc = TaskTokenizer("selective_copying", 5)
    assert [sc.token_class(i) for i in (tasks.NOISE, tasks.MARKER, 2, 4)] == ["noise", "marker", "data", "data"]
    ih = TaskTokenizer("induction_heads", 5)
    assert [ih.token_class(i) for i in (0, 3, tasks.trigger(5))] == ["ordinary", "ordinary", "trigger"]


def test_byte_pieces_decode_utf8_incrementally_like_decoding_everything_at_once():
    """What generate.py streams and look_inside.py labels tokens with."""
    text = "aé✓😀 done"
    data = list(text.encode("utf-8")) + [0xFF, 0xE2, 0x9C]  # then an invalid byte and a cut-off character
    pieces = list(ByteTokenizer().decode_pieces(data))
    assert "".join(pieces) == bytes(data).decode("utf-8", errors="replace")
    assert pieces[:6] == ["a", "", "é", "", "", "✓"]  # a character appears with its last byte, never half
    assert "\ufffd" not in "".join(pieces[:len(text.encode())])
