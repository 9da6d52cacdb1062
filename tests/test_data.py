"""data.py: sources (stdlib, file, folder, file:// URL), the token cache, get_batch and Batches."""

from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DataConfig, get_batch, load_dataset


def stream(ds) -> np.ndarray:
    """The whole token stream: train followed by val."""
    return np.concatenate([np.asarray(ds.train), np.asarray(ds.val)])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def test_stdlib_corpus_is_deterministic_and_a_few_megabytes(tmp_path):
    from pydoc_data.topics import topics

    a = load_dataset(DataConfig(cache_dir=str(tmp_path / "a")))
    b = load_dataset(DataConfig(cache_dir=str(tmp_path / "b")))
    assert np.array_equal(stream(a), stream(b))
    assert 1e6 < len(stream(a)) <= data.STDLIB_MAX_BYTES
    text = bytes(stream(a)).decode("utf-8")
    first = sorted(topics)[0]
    assert text.startswith(topics[first])  # the pydoc topics come first, in sorted order
    os_source = (Path(data.sysconfig.get_paths()["stdlib"]) / "os.py").read_text(encoding="utf-8")
    assert f"# os.py\n{os_source}" in text


def test_text_file_split_is_the_tail(tmp_path, unicode_text):
    text = unicode_text * 50
    ds = load_dataset(DataConfig(source=str(write(tmp_path / "t.txt", text)),
                                 cache_dir=str(tmp_path / "c"), val_fraction=0.1))
    n = len(text.encode("utf-8"))
    assert len(ds.val) == round(0.1 * n) and len(ds.train) + len(ds.val) == n
    assert bytes(stream(ds)) == text.encode("utf-8")
    assert ds.train.dtype == np.uint8 and isinstance(ds.train, np.memmap)


def test_folder_of_txt_files_concatenated_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    write(folder / "b.txt", "second ")
    write(folder / "sub" / "c.txt", "third")
    write(folder / "a.txt", "first ")
    write(folder / "notes.md", "not text to train on")
    ds = load_dataset(DataConfig(source=str(folder), cache_dir=str(tmp_path / "c")))
    assert bytes(stream(ds)) == b"first second third"


def test_char_tokenizer_dataset(tmp_path):
    text = "abcab\ncba 😀 " * 20
    ds = load_dataset(DataConfig(source=str(write(tmp_path / "t.txt", text)), tokenizer="char",
                                 cache_dir=str(tmp_path / "c")))
    assert ds.tokenizer.vocab_size == len(set(text)) and ds.train.dtype == np.uint8
    assert ds.tokenizer.decode(stream(ds)) == text


def test_large_file_is_encoded_in_pieces(tmp_path, monkeypatch, unicode_text):
    monkeypatch.setattr(data, "CHUNK_CHARS", 7)  # pieces far smaller than the file and the split
    text = unicode_text * 3
    path = write(tmp_path / "t.txt", text)
    for kind in ("byte", "char"):
        ds = load_dataset(DataConfig(source=str(path), tokenizer=kind, cache_dir=str(tmp_path / kind)))
        assert ds.tokenizer.decode(stream(ds)) == text


def test_file_url_is_downloaded_once_and_cached(tmp_path, unicode_text):
    source = write(tmp_path / "remote" / "input.txt", unicode_text)
    cfg = DataConfig(source=source.as_uri(), cache_dir=str(tmp_path / "c"))
    first = stream(load_dataset(cfg))
    assert bytes(first) == unicode_text.encode("utf-8")
    assert [p.read_bytes() for p in (tmp_path / "c" / "downloads").iterdir()] == [unicode_text.encode()]
    source.unlink()  # a second load must not fetch again
    assert np.array_equal(stream(load_dataset(cfg)), first)


def test_cache_is_reused_then_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "t.txt", "version one " * 20)
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "c"))
    first = load_dataset(cfg)

    def caches():  # the cache folders (an encoded corpus each) in cache_dir
        return sum(1 for p in (tmp_path / "c").iterdir() if (p / "meta.json").is_file())

    def no_build(*args):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(data, "_build", no_build)
        again = load_dataset(cfg)
    assert caches() == 1 and np.array_equal(stream(again), stream(first))

    write(path, "version two, longer " * 20)
    changed = load_dataset(cfg)
    assert caches() == 2  # a new cache beside the old one
    assert bytes(stream(changed)) == ("version two, longer " * 20).encode()
    load_dataset(DataConfig(source=str(path), tokenizer="char", cache_dir=cfg.cache_dir))
    assert caches() == 3


@pytest.mark.parametrize("make, match", [
    (lambda tmp: str(tmp / "missing.txt"), "not stdlib, a URL, or an existing file"),
    (lambda tmp: str(write(tmp / "empty.txt", "")), "is empty"),
    (lambda tmp: str((tmp / "nothing").mkdir() or tmp / "nothing"), "contains no .txt files"),
    (lambda tmp: (tmp / "gone.txt").as_uri(), "could not download file://"),
    (lambda tmp: str((tmp / "bad.txt").write_bytes(b"ok \xff\xfe") and tmp / "bad.txt"), "not UTF-8"),
], ids=["missing", "empty", "no-txt", "bad-url", "not-utf8"])
def test_unusable_sources_give_one_line_errors(tmp_path, make, match):
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(DataConfig(source=make(tmp_path), cache_dir=str(tmp_path / "c")))
    assert "\n" not in str(info.value)
    leftovers = [p for p in (tmp_path / "c").rglob("*") if p.name != "downloads"]
    assert leftovers == []  # no half-built cache or partial download is left behind


def test_config_checks():
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        DataConfig(tokenizer="word")


# ----------------------------------------------------------------------------------------------------
# get_batch


def test_batches_are_contiguous_windows_and_y_is_x_shifted():
    tokens = np.arange(1000, dtype=np.uint16)  # token k at position k: a window reveals its start
    x, y = get_batch(tokens, 64, 17, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 17) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = row_x[0]
        assert np.array_equal(row_x, tokens[start:start + 17])
        assert np.array_equal(row_y, tokens[start + 1:start + 18])


def test_batches_from_a_memmap_are_slices_of_the_stream(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh"), 3000))
    ds = load_dataset(DataConfig(source=str(write(tmp_path / "t.txt", text)), cache_dir=str(tmp_path)))
    x, y = get_batch(ds.train, 8, 24, torch.Generator().manual_seed(1))
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ds.train), 25)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (windows == row).all(axis=1).any()


def test_every_start_is_reachable_including_the_last():
    tokens = np.arange(20, dtype=np.uint8)
    g = torch.Generator().manual_seed(0)
    starts = {int(x[0]) for _ in range(50) for x in get_batch(tokens, 8, 17, g)[0]}
    assert starts == {0, 1, 2}  # 20 tokens hold windows of 18 at offsets 0, 1 and 2 only


def test_same_generator_state_gives_same_batches():
    tokens = np.arange(5000, dtype=np.uint16) % 251
    g = torch.Generator().manual_seed(123)
    get_batch(tokens, 4, 32, g)
    state = g.get_state()
    first = [get_batch(tokens, 4, 32, g) for _ in range(3)]
    g.set_state(state)
    again = [get_batch(tokens, 4, 32, g) for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])


def test_corpus_too_short_for_seq_len(tmp_path):
    ds = load_dataset(DataConfig(source=str(write(tmp_path / "t.txt", "x" * 40)), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        get_batch(ds.val, 2, 8, torch.Generator())
