"""evaluate.py: the long-sequence evaluation equals the full forward, accuracy counts the answer tokens, and
the command scores a task checkpoint at other lengths and refuses impossible ones in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import tasks
from mamba_config import MambaConfig
from model import MambaLM
from runs import train_task

ROOT = Path(__file__).resolve().parents[1]


def test_answer_logits_equal_the_full_forward(monkeypatch):
    """Chunked prefill then one forward from the state (PREFILL_TOKENS made small: chunks of 85, 30 and 1 tokens)."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=16, d_state=8)).eval()
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(50)
    x, y = tasks.selective_copying(3, 90, 16, 5, torch.Generator().manual_seed(0))
    scored = list(range(85, 90))
    with torch.no_grad():
        full = model(x)[:, scored]
    for limit in (2**16, 90, 1):   # chunks of 85 tokens (all at once), 30 (= 90 // 3), 1
        monkeypatch.setattr(evaluate, "PREFILL_TOKENS", limit)
        torch.testing.assert_close(evaluate.answer_logits(model, x, scored), full, rtol=1e-4, atol=1e-4)


def test_accuracy_counts_answer_tokens():
    """A model rigged to always answer the token id 2 scores exactly the fraction of answers that are 2, counted
    here from the same seeded examples."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=16, d_state=4)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = 1.0  # logits = hidden · row: 16 for id 2 and 0 for the others once hidden = 1
    model.backbone.norm_f.register_forward_hook(lambda m, a, out: torch.ones_like(out))
    acc = evaluate.accuracy_at(model, "selective_copying", 16, 4, 40, examples=50, batch_size=16, seed=3)
    g = torch.Generator().manual_seed(3)
    answers = torch.cat([tasks.selective_copying(n, 40, 16, 4, g)[1][:, -4:] for n in (16, 16, 16, 2)])
    assert acc == pytest.approx((answers == 2).float().mean().item())


def test_task_checkpoint_evaluates_at_other_lengths(tmp_path):
    train_task(tmp_path, "short", 2)
    out = tmp_path / "acc.json"
    command = [sys.executable, str(ROOT / "evaluate.py"), "tasks", "--ckpt", str(tmp_path / "short" / "ckpt.pt")]
    result = subprocess.run(command + ["--lengths", "8,64,256", "--examples", "20", "--max-tokens", "1024",
                                       "--json", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())[0]["results"]
    assert [r["length"] for r in results] == [8, 64, 256] and all(0 <= r["accuracy"] <= 1 for r in results)
    assert [r["examples"] for r in results] == [20, 16, 8]    # 1024 // 64 = 16; 1024 // 256 = 4, raised to 8
    assert json.loads(out.read_text())[0]["label"] == "Mamba (S6), 2 steps, seed 0"   # tests/runs.py trains with seed 0
    png = tmp_path / "both.png"
    drawn = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "plot", str(out), str(out), "--out", str(png)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    not_json = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "plot", str(png), "--out", str(png)],
                              capture_output=True, text=True, cwd=tmp_path)
    assert not_json.returncode == 2 and not_json.stderr.count("\n") == 1 and "not a file written" in not_json.stderr
    bad = subprocess.run(command + ["--lengths", "3"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "the length >= 2 * task_tokens" in bad.stderr


# ---- perplexity -----------------------------------------------------------------------------------------------

def perplexity_model():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=40, d_state=8)).eval()


def doc(n, seed=0):
    return torch.randint(40, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_the_whole_document_in_chunks_is_one_forward(chunk):
    model, ids = perplexity_model(), doc(123)
    with torch.no_grad():
        full = F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum").item()
    assert evaluate.document_nats(model, ids, chunk) == pytest.approx(full, rel=1e-5)


def test_sliding_windows_give_each_token_its_window_of_context():
    """Stride 1: token t is predicted from the window - 1 tokens before it (all of them near the start),
    computed here one token at a time; a window as long as the text is the whole document."""
    model, ids, window = perplexity_model(), doc(40, seed=1), 6
    with torch.no_grad():
        truth = sum(-model(ids[max(0, t - window + 1):t][None])[0, -1].log_softmax(-1)[ids[t]].item()
                    for t in range(1, len(ids)))
        whole = evaluate.document_nats(model, ids, 16)
    assert evaluate.sliding_window_nats(model, ids, window, 1, batch=4) == pytest.approx(truth, rel=1e-5)
    assert evaluate.sliding_window_nats(model, ids, 64, 32) == pytest.approx(whole, rel=1e-5)


def test_the_perplexity_command(tmp_path):
    train_task(tmp_path, "sc", 2)  # any checkpoint with a tokenizer: the task's symbols
    (tmp_path / "text.txt").write_text("..a..b|" * 30, encoding="utf-8")
    command = [sys.executable, str(ROOT / "evaluate.py"), "perplexity", "--ckpt", str(tmp_path / "sc" / "ckpt.pt"),
               "--text-file", str(tmp_path / "text.txt"), "--chunk", "16", "--window", "32", "--stride", "8"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("210 tokens, 209 of them predicted")
    assert lines[1].startswith("whole document, one sequence carried through the state (16 tokens at a time): ")
    assert lines[2].startswith("sliding window of 32 tokens, stride 8: ") and "perplexity" in lines[2]
    bad = subprocess.run(command[:-4] + ["--window", "8", "--stride", "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--stride must be in [1, --window = 8]" in bad.stderr
