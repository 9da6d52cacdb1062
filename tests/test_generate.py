"""generate.py: streams the same text for the same seed (equal to model.generate's), decodes UTF-8
incrementally, draws several samples, reports tokens/s, and refuses bad input in one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from data import DataConfig
from mamba_config import MambaConfig
from pretrained import load_checkpoint
from runs import train_run
from train import TrainConfig

torch.set_num_threads(1)  # the subprocesses use one thread too, so sampling sees the same logits
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
TEXT = "the cat sat on the mat. le café est ouvert ✓. the dog ran to the red house.\n" * 300


def trained(folder: Path, tokenizer: str, steps: int, **model) -> Path:
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    data = DataConfig(source=str(folder / "corpus.txt"), tokenizer=tokenizer, cache_dir=str(folder / "cache"),
                      val_fraction=0.1)
    cfg = TrainConfig(out_dir=str(folder / "out"), device="cpu", batch_size=4, seq_len=32, max_steps=steps,
                      lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=steps, eval_batches=1, ckpt_interval=steps)
    train_run(MambaConfig(d_model=32, n_layer=2, **model), data, cfg)
    return folder / "out" / "ckpt.pt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("byte"), "byte", 30)


@pytest.fixture(scope="module")
def transformer_ckpt(tmp_path_factory):
    """The Transformer baseline: its KV cache behind the same command."""
    return trained(tmp_path_factory.mktemp("transformer"), "byte", 30, layer="transformer", n_head=2)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("char"), "char", 2)


def run(*args, env=ENV):
    """generate.py on the CPU (what this process computes on, so sampled tokens can be compared)."""
    command = [sys.executable, str(ROOT / "generate.py"), "--device", "cpu", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120)


def test_same_seed_streams_the_same_text_as_model_generate(ckpt):
    prompt, n = "le café ✓ ", 80
    args = ("--ckpt", ckpt, "--prompt", prompt, "--max-new-tokens", n, "--temperature", 1.0, "--top-k", 100,
            "--seed", 7)
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert f"sampled {n} tokens (1 x {n}) in" in first.stderr and "tokens/s" in first.stderr

    # Independent path: batch generation in this process, decoded all at once.
    model, tokenizer, _ = load_checkpoint(ckpt)
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, n, temperature=1.0, top_k=100, generator=torch.Generator().manual_seed(7))
    assert first.stdout == prompt + bytes(out[0, ids.shape[1]:].tolist()).decode("utf-8", errors="replace") + "\n"

    other = run(*args[:-1], 8)
    assert other.returncode == 0 and other.stdout != first.stdout


@pytest.mark.parametrize("kind", ["ckpt", "transformer_ckpt"])
def test_prompts_of_different_lengths_share_a_batch_and_continue_as_alone(kind, request, tmp_path):
    """--prompt twice and a --prompt-file of two lines, each sampled twice: 8 rows in one left-padded batch; with
    temperature 0 every row is its prompt's greedy continuation computed alone, here by model.generate."""
    ckpt = request.getfixturevalue(kind)
    prompts = ["the cat", "a", "le café ✓ est", "the red house by the"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[2:]) + "\n\n", encoding="utf-8")
    result = run("--ckpt", ckpt, "--prompt", prompts[0], "--prompt", prompts[1], "--prompt-file",
                 tmp_path / "prompts.txt", "--num-samples", 2, "--max-new-tokens", 15, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert "sampled 120 tokens (8 x 15) in" in result.stderr
    model, tokenizer, _ = load_checkpoint(ckpt)
    expected = []
    for prompt in prompts:
        out = model.generate(torch.tensor([tokenizer.encode(prompt)]), 15, temperature=0)
        expected += [prompt + tokenizer.decode(out[0, -15:].tolist())] * 2
    assert result.stdout[:-1].split(generate.SEPARATOR) == expected


@pytest.mark.parametrize("kind, rows", [("ckpt", 1), ("ckpt", 3), ("transformer_ckpt", 3)])
def test_a_saved_state_continues_as_if_never_stopped(kind, rows, request, tmp_path):
    """40 tokens straight, against 25, --save-state, then 15 more from --resume-state: the same tokens, sampled
    (the states each run saves at its end hold them), and for Mamba the same text."""
    ckpt = request.getfixturevalue(kind)
    args = ("--ckpt", ckpt, "--prompt", "the dog", "--num-samples", rows, "--temperature", 1.0, "--seed", 11)
    straight = run(*args, "--max-new-tokens", 40, "--save-state", tmp_path / "straight.pt")
    first = run(*args, "--max-new-tokens", 25, "--save-state", tmp_path / "state.pt")
    assert first.returncode == 0 and "saved the state after 32 tokens" in first.stderr, first.stderr
    rest = run("--ckpt", ckpt, "--resume-state", tmp_path / "state.pt", "--max-new-tokens", 15, "--temperature", 1.0,
               "--save-state", tmp_path / "rest.pt")  # the sampling settings are the command's, not the state's
    assert rest.returncode == 0, rest.stderr
    assert torch.load(tmp_path / "state.pt", weights_only=True)["tokens"].shape == (rows, 32)
    tokens = [torch.load(tmp_path / f, weights_only=True)["tokens"] for f in ("straight.pt", "rest.pt")]
    assert tokens[0].shape == (rows, 47) and torch.equal(*tokens)
    if kind == "ckpt":  # whole characters at the split (the barely trained Transformer's text splits one)
        pieces = zip(first.stdout[:-1].split(generate.SEPARATOR), rest.stdout[:-1].split(generate.SEPARATOR))
        assert [a + b for a, b in pieces] == straight.stdout[:-1].split(generate.SEPARATOR)


def test_a_state_from_another_model_or_with_prompts_is_refused(ckpt, char_ckpt, tmp_path):
    made = run("--ckpt", char_ckpt, "--prompt", "the ", "--max-new-tokens", 2, "--save-state", tmp_path / "s.pt")
    assert made.returncode == 0, made.stderr
    for extra, words in (([], "was written by another model ([model] vocab_size = "),
                         (["--prompt", "x"], "--resume-state continues the rows it holds")):
        result = run("--ckpt", ckpt, "--resume-state", tmp_path / "s.pt", *extra)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    result = run("--ckpt", ckpt, "--resume-state", tmp_path / "bad.pt")
    assert result.returncode == 2 and "is not a readable state" in result.stderr


def test_several_samples_and_a_prompt_file(ckpt, tmp_path):
    (tmp_path / "prompt.txt").write_text("the dog", encoding="utf-8")
    result = run("--ckpt", ckpt, "--prompt-file", tmp_path / "prompt.txt", "--num-samples", 3,
                 "--max-new-tokens", 20, "--top-p", 0.9, "--seed", 3)
    assert result.returncode == 0, result.stderr
    samples = result.stdout[:-1].split(generate.SEPARATOR)
    assert len(samples) == 3 and all(s.startswith("the dog") for s in samples)
    assert len(set(samples)) == 3  # one generator, drawn on: the samples differ
    assert "sampled 60 tokens" in result.stderr


def test_compile_samples_the_eager_text_from_one_graph(ckpt, tmp_path):
    """--compile (MambaLM.compile_step): the same text as the eager step, two prompts of different lengths in one
    left-padded batch, then continued from the saved state; the compile is reported before sampling starts, and
    neither the sampling nor the resumed state's first step (a prompt's column) makes torch.compile recompile."""
    watch = {**ENV, "TORCH_LOGS": "recompiles"}   # torch.compile then logs every recompile to stderr
    args = ("--ckpt", ckpt, "--prompt", "the cat", "--prompt", "le", "--max-new-tokens", 40, "--seed", 3)
    eager = run(*args, "--save-state", tmp_path / "eager.pt")
    compiled = run(*args, "--save-state", tmp_path / "compiled.pt", "--compile", env=watch)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and compiled.stdout.count(generate.SEPARATOR) == 1
    assert "compiled the decoding step in" in compiled.stderr and "compiled the" not in eager.stderr
    resumed = [run("--ckpt", ckpt, "--resume-state", tmp_path / f"{kind}.pt", "--max-new-tokens", 20, *flags, env=watch)
               for kind, flags in (("eager", ()), ("compiled", ("--compile",)))]
    assert resumed[1].returncode == 0 and resumed[1].stdout == resumed[0].stdout, resumed[1].stderr
    assert "Recompiling" not in compiled.stderr + resumed[1].stderr


def test_a_compile_that_fails_is_one_line_and_exit_1(ckpt, tmp_path):
    """No C++ compiler (CXX names none; a fresh kernel cache, so that nothing compiled earlier is reused)."""
    env = {**ENV, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = run("--ckpt", ckpt, "--max-new-tokens", 5, "--compile", env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: --compile: torch.compile could not compile the step") \
        and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty prompt", "unknown char", "bad temperature",
                                  "bad top-k", "bad top-p", "no prompt file", "no tokens", "no gpu",
                                  "compile a transformer"])
def test_bad_input_is_one_line_and_exit_2(case, ckpt, char_ckpt, transformer_ckpt, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint")
    args, words = {
        "missing": (["--ckpt", tmp_path / "nope.pt"], "no such checkpoint file"),
        "corrupt": (["--ckpt", tmp_path / "corrupt.pt"], "is not a readable checkpoint"),
        "empty prompt": (["--ckpt", ckpt, "--prompt", ""], "a prompt is empty or encodes to no tokens"),
        "unknown char": (["--ckpt", char_ckpt, "--prompt", "the €"], "'€' (U+20AC) is not in the char vocabulary"),
        "bad temperature": (["--ckpt", ckpt, "--temperature", -1], "--temperature must be >= 0"),
        "bad top-k": (["--ckpt", ckpt, "--top-k", 0], "--top-k must be >= 1, got 0"),
        "bad top-p": (["--ckpt", ckpt, "--top-p", 1.5], "--top-p must be in (0, 1], got 1.5"),
        "no prompt file": (["--ckpt", ckpt, "--prompt-file", tmp_path / "none.txt"],
                           f"--prompt-file {tmp_path / 'none.txt'}: cannot read it as UTF-8 text"),
        "no tokens": (["--ckpt", ckpt, "--max-new-tokens", 0], "--max-new-tokens must be >= 1, got 0"),
        "no gpu": (["--ckpt", ckpt, "--device", "cuda"], "--device cuda, but torch sees no CUDA device"),
        "compile a transformer": (["--ckpt", transformer_ckpt, "--compile"],
                                  "--compile compiles a Mamba's recurrent step; this checkpoint is the Transformer"),
    }[case]
    if case == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and words in result.stderr, \
        result.stderr


def test_char_checkpoint_samples_known_characters(char_ckpt):
    result = run("--ckpt", char_ckpt, "--prompt", "the ", "--max-new-tokens", 30, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout) <= set(TEXT) and len(result.stdout) == len("the ") + 30 + 1
