"""checkpoint.py: atomic writes, and files that are missing, corrupt, foreign or carry code."""
import os
import pickle

import pytest
import torch

import checkpoint
from pretrained import load_checkpoint


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"format": checkpoint.CKPT_FORMAT, "step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    save = torch.save
    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def save_part_then_fail(obj, f, error=error):
            f.write(b"the first bytes of a checkpoint")
            raise error

        monkeypatch.setattr(torch, "save", save_part_then_fail)
        with pytest.raises(type(error)):
            checkpoint.save_checkpoint({"format": checkpoint.CKPT_FORMAT, "step": 2, "w": torch.zeros(4)}, path)
        assert path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    monkeypatch.setattr(torch, "save", save)
    checkpoint.save_checkpoint({"format": checkpoint.CKPT_FORMAT, "step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3 and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


class RunsCode:
    """Pickles to a call of os.system: what a malicious 'checkpoint' would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bad_checkpoints_give_one_line_and_code_is_never_run(tmp_path, one_line_error):
    good = {"format": checkpoint.CKPT_FORMAT, "step": 0}
    checkpoint.save_checkpoint(good, tmp_path / "good.pt")
    marker = tmp_path / "code_ran"
    cases = {"missing.pt": None, "garbage.pt": b"not a checkpoint at all",
             "truncated.pt": (tmp_path / "good.pt").read_bytes()[:40]}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    torch.save({"format": checkpoint.CKPT_FORMAT, "model": RunsCode(marker)}, tmp_path / "code.pt")
    torch.save({"some": torch.zeros(2)}, tmp_path / "foreign.pt")
    with open(tmp_path / "pickle.pt", "wb") as f:
        pickle.dump(RunsCode(marker), f, protocol=2)
    expect = {"missing.pt": "no such checkpoint file", "garbage.pt": "is not a readable checkpoint",
              "truncated.pt": "is not a readable checkpoint", "code.pt": "is not a readable checkpoint",
              "pickle.pt": "is not a readable checkpoint", "foreign.pt": "is not a baby_mamba checkpoint"}
    for name, words in expect.items():
        with pytest.raises(SystemExit) as stop:
            load_checkpoint(tmp_path / name)
        err = one_line_error()
        assert stop.value.code == 2 and words in err and "pass the path to a file written by main.py" in err, err
    assert not marker.exists()
