"""look_inside.py reports the Δ, B and C the model's own scan uses, and writes its figure; make_figures.py
writes both README diagrams."""
import importlib.util
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import look_inside
from mamba_config import MambaConfig
from model import MambaLM
from pretrained import load_checkpoint
from ssd import ssd_chunked
from tokenizer import ByteTokenizer
from transformer import TransformerLM

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
TEXT = "le café ✓ est ouvert.\n\tdef f(x):\n        return x + 1  # costs $5, not $6\n"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny untrained model saved the way train.py saves it (the keys load_checkpoint reads, and the rest)."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=256)
    model = MambaLM(config)
    with torch.no_grad():  # spread Δ over a wide range, so a mistake in the bias or the softplus would show
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.weight.mul_(30)
    return save_untrained(model, tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


def save_untrained(model, path):
    """model saved as train.py saves a checkpoint (the keys load_checkpoint reads, and the rest); returns path."""
    checkpoint.save_checkpoint({  # an empty optimizer state: building AdamW costs seconds and nothing here reads it
        "format": checkpoint.CKPT_FORMAT, "step": 0, "model": model.state_dict(), "optimizer": {},
        "rng": {"torch": torch.get_rng_state(), "cuda": None}, "data_rng": [torch.Generator().get_state()],
        "config": {"model": asdict(model.config), "data": {}, "training": {}},
        "tokenizer": ByteTokenizer().state_dict(), "metrics": {}}, path)
    return path


def scan_calls(model):
    """Wraps every mixer's scan to record the arguments the model passes to it and what it returns."""
    calls = []
    for layer in model.backbone.layers:
        def spy(*args, _scan=layer.mixer.scan, **kwargs):
            calls.append((args, kwargs, _scan(*args, **kwargs)))
            return calls[-1][2]
        layer.mixer.scan = spy
    return calls


def run_recurrence(u, delta, A, B, C, D, z):
    """The SSM one step at a time, written from the paper: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,
    y_t = (C_t h_t + D u_t) * silu(z_t). u, delta, z (d, l); A (d, n); B, C (l, n) -> y (d, l)."""
    h = torch.zeros(A.shape, dtype=torch.float64)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, None] * A) * h + delta[:, t, None] * B[t] * u[:, t, None]
        ys.append(h @ C[t] + D * u[:, t])
    return torch.stack(ys, dim=1) * F.silu(z)


def test_delta_b_c_are_the_ones_the_models_scan_uses(ckpt, tmp_path):
    result = look_inside.look_inside(ckpt, TEXT, out=tmp_path / "delta.png")
    model, tokenizer, _ = load_checkpoint(ckpt)
    calls = scan_calls(model)
    with torch.no_grad():
        model(torch.tensor([tokenizer.encode(TEXT)]))
    assert len(calls) == len(result["layers"]) == 2
    l = len(tokenizer.encode(TEXT))
    for mine, (args, kwargs, y) in zip(result["layers"], calls):
        u, dt, A, B, C, D = (a[0] if a.dim() == 3 else a for a in args)  # drop the batch of one
        assert kwargs["delta_softplus"]
        delta = F.softplus(dt + kwargs["delta_bias"][:, None])  # (d_inner, l): what the scan computes from these
        assert mine["delta"].shape == (l, 64) and mine["B"].shape == mine["C"].shape == (l, 16)
        torch.testing.assert_close(mine["delta"], delta.T, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["B"], B.T, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["C"], C.T, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["A"], A, rtol=0, atol=0)
        assert mine["delta"].min() < 1e-3 and mine["delta"].max() > 0.5  # a wide range of Δ was checked
        # Independent of the formula: the reported Δ, B, C drive a step-by-step recurrence to the scan's output.
        y_mine = run_recurrence(*(x.double() for x in (u, mine["delta"].T, A, mine["B"], mine["C"], D,
                                                       kwargs["z"][0])))
        torch.testing.assert_close(y_mine, y[0].double(), rtol=1e-4, atol=1e-5)


def test_per_token_statistics_and_summary(ckpt, tmp_path):
    result = look_inside.look_inside(ckpt, TEXT, out=tmp_path / "delta.png", file=io.StringIO())
    labels = result["labels"]
    assert "".join(labels) == TEXT and labels[6] == "" and labels[7] == "é"  # é is two bytes, shown on the last
    for layer, stats, summary in zip(result["layers"], result["stats"], result["summary"]):
        delta, A = layer["delta"].double(), layer["A"].double()
        survival = torch.stack([torch.exp(d[:, None] * A).mean() for d in delta])  # one token at a time
        torch.testing.assert_close(stats["survival"].double(), survival, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stats["delta"].double(), delta.mean(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["B_norm"], layer["B"].pow(2).sum(1).sqrt())
        largest = summary["largest"][0]
        assert largest[0] == int(delta.mean(1).argmax()) and largest[1] == pytest.approx(delta.mean(1).max())
        spaces = [t for t, c in enumerate(labels) if c == " "]
        assert summary["by_char"][" "] == pytest.approx(delta.mean(1)[spaces].mean().item())
        # memory over every token (text has no kinds): the entry that keeps a written value longest, by simulation:
        # a 1 written before the text decays by exp(Δ_t A) at every token; its 1/e point is the horizon
        kept = torch.exp((delta[:, :, None] * A).sum(0))                 # what is left of it after the text
        horizon = -len(labels) / torch.log(kept)
        memory = summary["memory"]
        assert memory["over"] == "token" and memory["entries"] == A.numel()
        assert memory["longest"] == pytest.approx(horizon.max().item(), rel=1e-5)
        assert memory["outlasting"] == {str(h): int((horizon > h).sum()) for h in look_inside.HORIZONS}


def test_the_script_writes_its_png_and_json(ckpt, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    png, numbers = tmp_path / "out" / "delta.png", tmp_path / "delta.json"
    png.parent.mkdir()
    command = [sys.executable, str(ROOT / "look_inside.py"), "--ckpt", str(ckpt), "--text-file", str(text_file),
               "--out", str(png), "--json", str(numbers)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    assert "layer 1: mean Δ" in done.stdout and "largest Δ" in done.stdout and "smallest Δ" in done.stdout
    saved = json.loads(numbers.read_text(encoding="utf-8"))
    expected = look_inside.look_inside(ckpt, TEXT, out=tmp_path / "again.png", file=io.StringIO())
    assert saved["tokens"] == expected["labels"] and len(saved["layers"]) == 2
    for layer, stats in zip(saved["layers"], expected["stats"]):
        assert layer["delta"] == pytest.approx(stats["delta"].tolist(), rel=1e-6)
        assert layer["survival"] == pytest.approx(stats["survival"].tolist(), rel=1e-6)


def test_token_ids_and_max_tokens(ckpt, tmp_path, capsys):
    look_inside.main(["--ckpt", str(ckpt), "--ids", "104,105,0,33", "--max-tokens", "3", "--out",
                      str(tmp_path / "ids.png"), "--json", str(tmp_path / "ids.json")])
    saved = json.loads((tmp_path / "ids.json").read_text(encoding="utf-8"))
    assert saved["ids"] == [104, 105, 0] and saved["tokens"] == ["h", "i", "\x00"]
    assert len(saved["layers"][0]["delta"]) == 3 and (tmp_path / "ids.png").stat().st_size > 0
    assert "first 3 of 4 tokens" in capsys.readouterr().err


def test_bad_input_stops_with_one_line(ckpt, tmp_path, capsys):
    for args, message in ((["--text", ""], "the text is empty or encodes to no tokens"),
                          (["--ids", "1,x"], "comma-separated integers"),
                          (["--ids", "1,256"], "token ids must be in [0, 256)")):
        with pytest.raises(SystemExit) as stop:
            look_inside.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x.png"), *args])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.png").exists()


def test_a_transformer_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    model = TransformerLM(MambaConfig(layer="transformer", d_model=32, n_layer=1, n_head=2, vocab_size=256))
    path = save_untrained(model, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as stop:
        look_inside.main(["--ckpt", str(path), "--out", str(tmp_path / "x.png"), "--text", "abc"])
    assert stop.value.code == 2 and "no step size Δ to show" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_task_example_with_ablation_switches(tmp_path, capsys):
    """A Selective Copying checkpoint whose model has a fixed B and a selective A: the reported Δ and decay step
    are the scan's (Δ from its dt and bias, the decay step Δ·A_scale), and the data/noise ratio is the ratio of
    the mean Δ over the example's data tokens and noise tokens, recounted here from the token ids."""
    from tasks import selective_copying
    from tokenizer import TaskTokenizer

    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=16, selective_B=False, selective_A=True)
    model = MambaLM(config)
    path = tmp_path / "task.pt"
    checkpoint.save_checkpoint({
        "format": checkpoint.CKPT_FORMAT, "step": 0, "model": model.state_dict(), "optimizer": {},
        "rng": {"torch": torch.get_rng_state(), "cuda": None}, "data_rng": [torch.Generator().get_state()],
        "config": {"model": asdict(config), "data": {"task": "selective_copying", "task_vocab": 16, "task_tokens": 4},
                   "training": {"seq_len": 40}},
        "tokenizer": TaskTokenizer("selective_copying", 16).state_dict(), "metrics": {}}, path)
    result = look_inside.look_inside(path, out=tmp_path / "task.png", task_example=7)
    ids = selective_copying(1, 40, 16, 4, torch.Generator().manual_seed(7))[0][0].tolist()
    assert result["ids"] == ids and "".join(result["labels"]) == TaskTokenizer("selective_copying", 16).decode(ids)
    calls = scan_calls(model.eval())
    with torch.no_grad():
        model(torch.tensor([ids]))
    for mine, summary, (args, kwargs, _) in zip(result["layers"], result["summary"], calls):
        dt = args[1][0]
        delta = F.softplus(dt + kwargs["delta_bias"][:, None]).T                       # (l, d_inner)
        torch.testing.assert_close(mine["delta"], delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["decay_step"], delta * kwargs["A_scale"][0].T, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine["B"], args[3], rtol=0, atol=0)                  # the fixed (d_inner, n) B
        per_token = delta.mean(1)
        data = per_token[[t for t, i in enumerate(ids) if i >= 2]].mean()
        noise = per_token[[t for t, i in enumerate(ids) if i == 0]].mean()
        assert summary["data_noise_ratio"] == pytest.approx((data / noise).item(), rel=1e-5)
    assert "data/noise ratio" in capsys.readouterr().out
    assert (tmp_path / "task.png").read_bytes().startswith(PNG)


def test_induction_heads_memory_is_over_the_tokens_between_the_stored_one_and_the_query(tmp_path, capsys):
    """--task-example with --length on an Induction Heads checkpoint: an example of that length, and the memory
    measured over the positions after the token to remember and before the final trigger only."""
    from tasks import induction_heads
    from tokenizer import TaskTokenizer

    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=16)
    path = tmp_path / "ih.pt"
    checkpoint.save_checkpoint({
        "format": checkpoint.CKPT_FORMAT, "step": 0, "model": MambaLM(config).state_dict(), "optimizer": {},
        "rng": {"torch": torch.get_rng_state(), "cuda": None}, "data_rng": [torch.Generator().get_state()],
        "config": {"model": asdict(config), "data": {"task": "induction_heads", "task_vocab": 16, "task_tokens": 4},
                   "training": {"seq_len": 40}},
        "tokenizer": TaskTokenizer("induction_heads", 16).state_dict(), "metrics": {}}, path)
    result = look_inside.look_inside(path, out=tmp_path / "ih.png", task_example=5, length=90)
    ids = induction_heads(1, 90, 16, torch.Generator().manual_seed(5))[0][0].tolist()
    assert result["ids"] == ids
    between = list(range(ids.index(15) + 2, 89))
    for layer, summary in zip(result["layers"], result["summary"]):
        horizon = 1 / (layer["delta"][between].mean(0)[:, None] * layer["A"].abs())   # no selective A: step = Δ
        assert summary["memory"]["over"] == "in-between"
        assert summary["memory"]["longest"] == pytest.approx(horizon.max().item(), rel=1e-6)
    assert "memory over in-between tokens" in capsys.readouterr().out


def test_make_figures_writes_every_diagram(tmp_path):
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "assets" / "make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    make_figures.main(["--out-dir", str(tmp_path / "figs")])
    # The duality figure's matrix is Mamba-2's SSM: M @ x is the chunked algorithm's y, with chunks of any size.
    M, _ = make_figures.ssd_matrix(l=10, n=3, seed=4)
    g = torch.Generator().manual_seed(4)
    dt = torch.rand(1, 10, 1, generator=g, dtype=torch.float64) * 0.4 + 0.05
    B, C = (torch.randn(1, 10, 1, 3, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.randn(1, 10, 1, 1, generator=g, dtype=torch.float64)
    y = ssd_chunked(x, dt, torch.tensor([-1.0], dtype=torch.float64), B, C, chunk_size=4)
    torch.testing.assert_close(M @ x[0, :, 0, 0], y[0, :, 0, 0])
    for name in ("ssm.png", "mamba_architecture.png", "ssd_duality.png"):
        data = (tmp_path / "figs" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
