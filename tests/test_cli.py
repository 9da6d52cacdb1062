"""cli.py: the device rule (CUDA, then Apple's MPS, then the CPU), and the one-line errors of reading inputs."""
import pytest
import torch

import cli


@pytest.mark.parametrize("cuda, mps, auto", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_the_cpu(cuda, mps, auto, monkeypatch):
    """No machine here has CUDA or MPS: what torch reports is replaced, the rule itself runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert cli.pick_device("auto", "--device") == torch.device(auto)
    assert cli.pick_device("cpu", "--device") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_a_device_torch_does_not_see_is_one_line(name, monkeypatch, one_line_error):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        cli.pick_device(name, "[training] device =")
    assert stop.value.code == 2
    assert f"[training] device = {name}, but torch sees no {name.upper()} device" in one_line_error()


def test_reading_inputs_names_the_flag(tmp_path, one_line_error):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "ok.txt").write_bytes(b"a\r\nb")
    assert cli.read_text(tmp_path / "ok.txt", "--text-file") == "a\r\nb"  # stored bytes, CRLF kept
    for path in (tmp_path / "missing.txt", tmp_path / "latin1.txt"):
        with pytest.raises(SystemExit):
            cli.read_text(path, "--text-file")
        assert f"--text-file {path}: cannot read it as UTF-8 text" in one_line_error()
    assert cli.int_list("64,128", "--lengths") == [64, 128]
    with pytest.raises(SystemExit):
        cli.int_list("64,x", "--lengths")
    assert "--lengths must be comma-separated integers, got '64,x'" in one_line_error()
