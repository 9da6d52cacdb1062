"""train.py: the loss goes down, checkpoints are atomic, safe to load and resume exactly, NaN stops the
run, the learning-rate schedule follows its formula, and two gloo processes train one model."""
import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import config
import main
import train
from data import Batches, DataConfig, load_dataset
from mamba_config import MambaConfig
from model import MambaLM
from pretrained import load_checkpoint
from runs import train_run
from train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# What a run leaves in out_dir; loss.png only where matplotlib is installed (it is optional).
OUTPUTS = ["ckpt.pt", "config.ini", "log.csv"] + ["loss.png"] * bool(importlib.util.find_spec("matplotlib"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)  # tiny models: one thread is fastest, and the 2 cores are shared
WORDS = "the cat sat on a mat and saw a dog run to the big red house by the small green tree".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small local text (about 40 kB of short sentences) and a data cache for it."""
    folder = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(n),), generator=g)) + "."
             for n in torch.randint(4, 11, (1200,), generator=g)]
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    return DataConfig(source=str(folder / "corpus.txt"), cache_dir=str(folder / "cache"), val_fraction=0.1)


# The trainer trains whatever [model] builds; each feature test runs on both kinds of sequence model.
LAYERS = {"mamba1": "", "transformer": "layer = transformer\nn_head = 2\n"}


def tiny_model(layer="mamba1") -> MambaConfig:
    heads = {} if layer == "mamba1" else {"n_head": 2}
    return MambaConfig(d_model=32, n_layer=2, vocab_size=256, layer=layer, **heads)


def tiny_train(out_dir, **overrides) -> TrainConfig:
    settings = dict(out_dir=str(out_dir), device="cpu", batch_size=4, seq_len=32, max_steps=12, lr=1e-2,
                    min_lr=1e-3, warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=2, ckpt_interval=100)
    return TrainConfig(**{**settings, **overrides})


def read_log(out_dir) -> list[dict]:
    with open(Path(out_dir) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("layer", LAYERS)
def test_training_lowers_the_loss_and_writes_its_files(corpus, tmp_path, layer):
    out = tmp_path / "run"
    metrics = train_run(tiny_model(layer), corpus, tiny_train(out, max_steps=40, eval_interval=20))
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [0, 20, 40]
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "val_bits_per_byte", "val_ppl", "val_accuracy", "lr",
                             "tokens_per_s", "elapsed_s"]
    first, last = float(rows[0]["val_loss"]), float(rows[-1]["val_loss"])
    assert abs(first - math.log(256)) < 0.1  # an untrained model is close to uniform over 256 bytes
    assert last < first - 2.0
    assert metrics["val_loss"] == last and metrics["step"] == 40 and metrics["unit"] == "byte"
    assert math.isclose(metrics["val_bits"], last / math.log(2)) and math.isclose(metrics["val_ppl"], math.exp(last))
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    if "loss.png" in OUTPUTS:
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain containers and tensors only
    assert ckpt["format"] == checkpoint.CKPT_FORMAT and ckpt["step"] == 40
    assert ckpt["config"]["training"]["max_steps"] == 40 and ckpt["tokenizer"] == {"kind": "byte"}
    loaded = config.load(str(out / "config.ini"), main.SECTIONS)  # the resolved config reads back
    model_cfg, data_cfg, train_cfg = (loaded.build(section) for section in main.SECTIONS)
    assert data_cfg == corpus and train_cfg == tiny_train(out, max_steps=40, eval_interval=20)
    assert model_cfg == tiny_model(layer)

    # Independent check of the logged number: the loaded checkpoint's plain cross-entropy on the same batches.
    model, tokenizer, _ = load_checkpoint(out / "ckpt.pt")
    cfg = tiny_train(out)
    batches = Batches(corpus, load_dataset(corpus), cfg.batch_size, cfg.seq_len).validation(cfg.eval_batches, cfg.seed)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).transpose(1, 2), y).item() for x, y in batches]
    assert math.isclose(sum(losses) / len(losses), last, rel_tol=1e-5)


@pytest.mark.parametrize("layer", LAYERS)
def test_resume_after_an_interrupt_reproduces_the_uninterrupted_run_exactly(corpus, tmp_path, monkeypatch, capsys,
                                                                              layer):
    straight = tmp_path / "straight"
    train_run(tiny_model(layer), corpus, tiny_train(straight, grad_accum=2))

    # A real SIGINT in the middle of step 6 (index 5): the step finishes, is saved, and the run exits 130.
    lr_at = train.lr_at

    def lr_at_with_ctrl_c(step, cfg):
        if step == 5 and cfg.max_steps == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, cfg)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(train, "lr_at", lr_at_with_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train_run(tiny_model(layer), corpus, tiny_train(resumed, grad_accum=2))
    assert stop.value.code == 130 and "interrupted: saved step 6" in capsys.readouterr().err
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["step"] == 6
    assert [r["step"] for r in read_log(resumed)] == ["0", "4"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(train, "lr_at", lr_at)

    train_run(tiny_model(layer), corpus, tiny_train(resumed, grad_accum=2), resume=True)
    columns = ("step", "train_loss", "val_loss", "val_bits_per_byte", "lr")
    expected = [[row[c] for c in columns] for row in read_log(straight)]
    assert [[row[c] for c in columns] for row in read_log(resumed)] == expected  # the same floats, bit for bit
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, resumed))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])


def test_resume_refuses_a_missing_or_different_checkpoint(corpus, tmp_path, capsys, one_line_error):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_run(tiny_model(), corpus, tiny_train(out), resume=True)
    assert stop.value.code == 2 and "does not exist" in one_line_error()
    train_run(tiny_model(), corpus, tiny_train(out, max_steps=2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train_run(MambaConfig(d_model=48, n_layer=2, vocab_size=256), corpus, tiny_train(out), resume=True)
    assert stop.value.code == 2 and "d_model = 32" in one_line_error()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    forward, calls = MambaLM.forward, []

    def forward_going_nan_at_step_6(self, input_ids):
        logits = forward(self, input_ids)
        if self.training:
            calls.append(1)
            if len(calls) >= 6:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(MambaLM, "forward", forward_going_nan_at_step_6)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_run(tiny_model(), corpus, tiny_train(out, max_steps=10, ckpt_interval=2))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 1 and len(lines) == 1
    assert "step 6: the loss is nan" in lines[0] and "last good checkpoint" in lines[0] and "(step 4)" in lines[0]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


def test_without_matplotlib_there_is_no_plot_and_no_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    train.plot_losses(tmp_path, [{"step": 0, "train_loss": None, "val_loss": 5.5}])
    assert list(tmp_path.iterdir()) == []


def test_learning_rate_schedule_follows_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert train.lr_at(0, cfg) == pytest.approx(1e-4)  # 1/10 of the way up
    assert train.lr_at(4, cfg) == pytest.approx(5e-4)
    assert train.lr_at(9, cfg) == pytest.approx(1e-3)  # peak at the last warm-up step
    assert train.lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert train.lr_at(35, cfg) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(60, cfg) == pytest.approx(5.5e-4)  # half-way: the mean of peak and floor
    assert train.lr_at(110, cfg) == pytest.approx(1e-4) and train.lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [train.lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert train.lr_at(0, TrainConfig(lr=2e-3, min_lr=0.0, warmup_steps=0, max_steps=4)) == 2e-3


@pytest.mark.parametrize("field, value, words", [
    ("batch_size", 0, "batch_size must be > 0"), ("lr", -1.0, "lr must be > 0"),
    ("min_lr", 1.0, "min_lr must be <= lr = 0.003"), ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("beta2", 1.0, "beta2 must be in [0, 1)"), ("grad_clip", -1.0, "grad_clip must be >= 0")])
def test_impossible_training_settings_are_refused_by_name(field, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_evaluation_uses_a_fixed_set_of_batches_and_is_deterministic(corpus):
    cfg = tiny_train("unused", eval_batches=3)
    source = Batches(corpus, load_dataset(corpus), cfg.batch_size, cfg.seq_len)
    batches, again = source.validation(3, cfg.seed), source.validation(3, cfg.seed)
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                     for a, b in zip(batches, again))
    torch.manual_seed(0)
    model = MambaLM(tiny_model())
    rt = train.Runtime(torch.device("cpu"), torch.float32)
    loss, accuracy = train.evaluate(model, batches, rt, 256)
    assert train.evaluate(model, batches, rt, 256) == (loss, accuracy) and model.training  # mode restored
    with torch.no_grad():  # independent truth: -log p(target) and argmax == target, over every position
        logits = torch.cat([model(x) for x, _ in batches])
        y = torch.cat([y for _, y in batches])
    assert loss == pytest.approx(-logits.log_softmax(-1).gather(-1, y[..., None]).mean().item(), rel=1e-6)
    assert accuracy == pytest.approx((logits[..., :256].argmax(-1) == y).float().mean().item())


def test_task_evaluation_counts_only_the_answers():
    """Selective Copying batches: loss and accuracy over the marker positions only, and validation examples
    that are not the training examples (a separate stream of the same seed)."""
    data = DataConfig(task="selective_copying", task_vocab=8, task_tokens=3)
    cfg = tiny_train("unused", eval_batches=2, seq_len=20)
    source = Batches(data, None, cfg.batch_size, cfg.seq_len)
    val = source.validation(cfg.eval_batches, cfg.seed)
    first_train = source.train(torch.Generator().manual_seed(cfg.seed))
    assert not torch.equal(val[0][0], first_train[0])
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=8))
    loss, accuracy = train.evaluate(model, val, train.Runtime(torch.device("cpu"), torch.float32), 8)
    with torch.no_grad():
        logits = torch.cat([model(x)[:, -3:] for x, _ in val])
    answers = torch.cat([y[:, -3:] for _, y in val])
    assert loss == pytest.approx(F.cross_entropy(logits.flatten(0, 1), answers.flatten()).item(), rel=1e-6)
    assert accuracy == pytest.approx((logits.argmax(-1) == answers).float().mean().item())


def write_ini(path, corpus, out_dir, layer="mamba1", **training):
    settings = {"out_dir": out_dir, "device": "cpu", "batch_size": 4, "seq_len": 32, "max_steps": 6, "lr": 1e-2,
                "min_lr": 1e-3, "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2, "log_interval": 1,
                "ckpt_interval": 3, **training}
    path.write_text(f"[model]\nd_model = 32\nn_layer = 2\n{LAYERS[layer]}\n"
                    f"[data]\nsource = {corpus.source}\ncache_dir = {corpus.cache_dir}\nval_fraction = 0.1\n\n"
                    "[training]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


@pytest.mark.parametrize("layer", LAYERS)
def test_two_gloo_processes_under_torchrun_train_one_model(corpus, tmp_path, layer):
    write_ini(tmp_path / "config.ini", corpus, tmp_path / "out", layer)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "main.py"), "-c", str(tmp_path / "config.ini")],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("parameters; device cpu (float32), 2 processes") == 1  # only rank 0 speaks
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    # Two data streams, one per process, in different places; the replicas' weights were checked bit-identical
    # at every save (a difference stops the run with exit status 1).
    assert ckpt["step"] == 6 and len(ckpt["data_rng"]) == 2
    assert not torch.equal(ckpt["data_rng"][0], ckpt["data_rng"][1])
    rows = read_log(tmp_path / "out")
    assert [r["step"] for r in rows] == ["0", "3", "6"] and float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    assert rows[-1]["tokens_per_s"] != ""


def test_ctrl_c_in_main_saves_and_exits_130_then_resume_finishes(corpus, tmp_path):
    out = tmp_path / "out"
    write_ini(tmp_path / "config.ini", corpus, out, max_steps=100000, ckpt_interval=100000, eval_interval=100000)
    command = [sys.executable, str(ROOT / "main.py"), "-c", str(tmp_path / "config.ini")]
    proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.csv").exists() and time.time() < deadline:  # the step-0 evaluation is done
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: saved step" in err and "Traceback" not in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]  # 0 if a loaded machine was still on step 1
    resumed = subprocess.run(command + ["--resume", "--set", f"training.max_steps={step + 2}"], cwd=tmp_path,
                             env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}" in resumed.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step + 2


def test_compile_trains_like_eager(corpus, tmp_path):
    """[training] compile = true on the CPU (torch.compile of the model around the eager fast scan): the same
    validation losses as the eager run, to float tolerance. Slow (compilation), but the path must run."""
    eager = read_log_losses(tmp_path / "eager", corpus, compile=False)
    compiled = read_log_losses(tmp_path / "compiled", corpus, compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4) and eager[-1] < eager[0]


def read_log_losses(out, corpus, compile):
    train_run(tiny_model(), corpus, tiny_train(out, max_steps=4, eval_interval=2, compile=compile))
    return [float(row["val_loss"]) for row in read_log(out)]
