"""pytest setup shared by every test file: the repo root on sys.path, and one CPU thread.

One thread because CI and laptops share their few cores with other work: with torch's default of
one OpenMP thread per core, a busy neighbour makes every small op wait for the slowest thread,
and the tiny models in tests run many times slower. Subprocesses inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def one_line_error(capsys):
    """Reads what the code under test printed to stderr, checks it is exactly one `error: ...` line
    (the project's rule for bad input), and returns it."""
    def read():
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err
    return read


@pytest.fixture
def unicode_text():
    """Text that trips byte and character handling: CRLF, NUL, combining marks, many scripts, emoji
    sequences and astral-plane characters."""
    return ("plain ASCII, tabs\tand\r\nCRLF, NUL \x00, é vs e\u0301 (combining), Zoë, Ελληνικά, "
            "中文字符, 日本語のかな, 한국어, emoji 😀👍🏽 and a family 👨‍👩‍👧, math 𝔸∑∫, RTL עברית")
