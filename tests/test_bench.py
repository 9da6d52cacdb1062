"""bench/: each benchmark script runs end to end at a tiny size, printing its markdown table and finite ratios, and
the baselines of bench_generate.py decode with their caches exactly as their full forward computes.

The figures themselves are the lead's to measure on a quiet machine (docs/performance.md); these only keep the
scripts working as model.py, transformers and mambapy change under them.
"""
import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "bench_generate.py")
bench_generate = importlib.util.module_from_spec(_spec)  # a script, not a package: loaded from its file
_spec.loader.exec_module(bench_generate)
build_models, decoder = bench_generate.build_models, bench_generate.decoder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--d-model", "32", "--n-layer", "2", "--threads", "1"]


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *TINY, *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def printed_ratios(stdout):
    """The values of the '- name: 1.23x' lines under 'ratios'."""
    return [float(v) for v in re.findall(r"^- .*: (\S+)x", stdout.split("ratios")[1], re.MULTILINE)]


def check_ratios(stdout, saved, expected):
    values = printed_ratios(stdout)
    assert len(values) == len(saved) == expected, stdout
    assert all(math.isfinite(v) and v > 0 for v in [*values, *saved]), stdout


def test_bench_generate_prints_per_token_and_prefill_tables(tmp_path):
    stdout = run("bench_generate.py", "--contexts", "16,48", "--steps", "3", "--warmup", "1", "--full-steps", "1",
                 "--prefill-len", "24", "--repeats", "1", "--png", str(tmp_path / "g.png"),
                 "--json", str(tmp_path / "g.json"))
    saved = json.loads((tmp_path / "g.json").read_text())
    assert "| context | ours: recurrent step (ms/token) |" in stdout
    assert int(re.search(r"aten operations per decoding step \(ours, batch 1\): (\d+)", stdout).group(1)) > 20
    assert [r["context"] for r in saved["per_token_ms"]] == [16, 48]
    assert re.search(r"^\| 48 \|( [0-9.]+ \|){5}$", stdout, re.MULTILINE), stdout
    assert re.search(r"^compiled: the first step, which compiles the graph, took [0-9.]+ s$", stdout, re.MULTILINE)
    # ours@48 / ours@16, transformer, full and hf over ours at 48, hf / ours over the contexts (median, lowest),
    # ours / compiled (median) and hf / compiled (lowest)
    check_ratios(stdout, list(saved["ratios"].values()), 8)
    rows, found = saved["per_token_ms"], saved["ratios"]
    assert found["hf / ours, lowest over contexts (the target's figure: >= 2.5)"] == \
        pytest.approx(min(r["hf"] / r["ours"] for r in rows))
    assert found["hf / compiled, lowest over contexts"] == pytest.approx(min(r["hf"] / r["compiled"] for r in rows))
    assert set(saved["prefill_s"]) == {"ours", "hf", "mambapy", "transformer"}
    assert "| mambapy: LM step per token |" in stdout
    assert (tmp_path / "g.png").stat().st_size > 0


def test_bench_scan_prints_a_row_per_shape_with_forced_chunk_counts():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scan.py"), "--sizes", "2x32", "--lengths",
                          "48", "--methods", "fast,loop,fast@1,fast@3", "--repeats", "1"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| b x d | l | mode | fast time / peak | loop time / peak | fast@1 time / peak | fast@3 time / peak |" \
        in out.stdout
    row = r"^\| 2x32 \| 48 \| fwdbwd \|( [0-9.]+ ms / \d+ MB \|){4} [0-9.]+x \|$"   # four timed cells, a ratio
    assert re.search(row, out.stdout, re.MULTILINE), out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scan.py"), "--methods", "fast,fast@0"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: unknown --methods fast@0: use fast, loop, pscan or fast@K (K chunks, K >= 1)"]


def test_bench_scan_fast_at_k_runs_the_scan_in_k_chunks(monkeypatch):
    import selective_scan
    spec = importlib.util.spec_from_file_location("bench_scan", ROOT / "bench" / "bench_scan.py")
    bench_scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scan)
    monkeypatch.setattr(selective_scan, "_chunk_len", selective_scan._chunk_len)   # restored after the test
    u, delta, A, B, C = bench_scan.make_inputs(2, 8, 50, 4, "cpu")
    expected = selective_scan.selective_scan_ref(u, delta, A, B, C)
    for chunks in (1, 3, 7):
        fn = bench_scan.method_fn(f"fast@{chunks}")
        T = selective_scan._chunk_len(50, 2 * 4 * 8, False)
        assert -(-50 // T) == chunks
        torch.testing.assert_close(fn(u, delta, A, B, C), expected, atol=1e-5, rtol=1e-4)


def test_bench_train_prints_tokens_per_second_and_mfu(tmp_path):
    stdout = run("bench_train.py", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
                 "--mm-size", "256", "--mm-repeats", "2", "--json", str(tmp_path / "t.json"))
    saved = json.loads((tmp_path / "t.json").read_text())
    for name in ("ours", "mamba2", "mambapy", "transformer"):
        assert re.search(rf"^\| {name}( \(\d+ layers?\))? \| [\d,]+ \| [0-9.]+ \| \d+ \|.*% \| \d+ MB \|$", stdout,
                         re.MULTILINE), stdout
        assert 0 < saved["models"][name]["mfu"] < math.inf
    assert saved["models"]["ours"]["params"] == saved["models"]["mambapy"]["params"]   # the same size
    check_ratios(stdout, list(saved["ratios"].values()), 4)


def test_bench_train_times_ours_with_its_scan_in_forced_chunks(tmp_path):
    stdout = run("bench_train.py", "--models", "ours,ours@2", "--batch", "2", "--seq", "32", "--steps", "1",
                 "--rounds", "1", "--mm-size", "128", "--mm-repeats", "1", "--json", str(tmp_path / "t.json"))
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["models"]["ours@2"]["scan_chunks"] == 2 and saved["models"]["ours"]["scan_chunks"] == 5   # rule
    assert "chunks of the fast scan per sequence: ours 5, ours@2 2" in stdout
    assert re.search(r"^\| ours@2 \| [\d,]+ \| [0-9.]+ \|", stdout, re.MULTILINE), stdout
    check_ratios(stdout, list(saved["ratios"].values()), 1)                               # ours@2 / ours
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--models", "ours,ours@x"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: unknown --models ours@x: use ours, mamba2, mambapy, transformer or ours@K (its scan in K chunks)"]


def test_cached_decoding_of_the_baselines_matches_their_full_forward():
    """The per-token timings mean something only if the cached paths compute what the full forward does."""
    args = SimpleNamespace(d_model=32, n_layer=2, vocab=256, device="cpu", bf16=False)
    models = build_models(args, names={"transformer", "hf"})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    full = {"transformer": lambda: models["transformer"](ids)[:, -1], "hf": lambda: models["hf"](ids).logits[:, -1]}
    with torch.inference_mode():
        for name in ("transformer", "hf"):
            start, step = decoder(name, models, args)
            logits, state = start(ids[:, :9])
            for t in range(9, 12):
                logits, state = step(ids[:, t], state, t)
            torch.testing.assert_close(logits, full[name](), atol=1e-5, rtol=1e-5)


def test_bench_prefill_prints_chunked_and_one_pass_rows():
    out = run("bench_prefill.py", "--lengths", "64,256", "--chunk", "32", "--one-pass-max", "64", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith(("| 64 |", "| 256 |"))]
    assert len(rows) == 2 and rows[0].count("MB") == 2 and rows[1].endswith("| not run |"), out


def test_compare_runs_tables_two_seeds_and_another_model(tmp_path):
    """Three tiny runs: the per-run rows carry log.csv's last figures, the seed groups their mean and spread."""
    from data import DataConfig
    from mamba_config import MambaConfig
    from runs import train_run
    from train import TrainConfig
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 400, encoding="utf-8")
    data = DataConfig(source=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    runs = {"a1": ("mamba1", 1), "a2": ("mamba1", 2), "t1": ("transformer", 1)}
    for name, (layer, seed) in runs.items():
        train_run(MambaConfig(d_model=16, n_layer=1, layer=layer, n_head=2), data,
                  TrainConfig(out_dir=str(tmp_path / name), device="cpu", seed=seed, batch_size=2, seq_len=16,
                              max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1, ckpt_interval=2))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_runs.py"), *(str(tmp_path / n) for n in runs),
                          "--png", str(tmp_path / "c.png")], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    final = {}
    for name in runs:
        with open(tmp_path / name / "log.csv") as f:
            last = list(csv.DictReader(f))[-1]
        final[name], accuracy = float(last["val_loss"]), float(last["val_accuracy"])
        assert re.search(rf"^\| {name} \| {runs[name][0]} \| [\d,]+ \| {runs[name][1]} \| 2 \| {final[name]:.4f} \| "
                         rf"[0-9.]+ \| {accuracy:.2%} \|", out.stdout, re.MULTILINE), out.stdout
    mean, spread = (final["a1"] + final["a2"]) / 2, abs(final["a1"] - final["a2"])
    assert f"| a1, a2 | mamba1 | 1, 2 | {mean:.4f} | {spread:.4f} |" in out.stdout
    assert f"| t1 | transformer | 1 | {final['t1']:.4f} | 0.0000 |" in out.stdout
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_runs.py"), str(tmp_path)], env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a run's out_dir" in bad.stderr and bad.stderr.count("\n") == 1
