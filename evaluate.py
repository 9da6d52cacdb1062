"""Evaluate trained models: a task checkpoint at other lengths, and the perplexity of a text.

    python evaluate.py tasks --ckpt out/induction_heads/ckpt.pt [more] --lengths 64,256,1024,4096,16384,65536
                             [--examples 256] [--max-tokens N] [--json results.json] [--plot accuracy.png]
    python evaluate.py plot results.json [more.json] --out accuracy.png      # several saved evaluations together
    python evaluate.py perplexity --ckpt out/ckpt.pt --val            # the checkpoint's held-out split
    python evaluate.py perplexity --pretrained DIR --text-file book.txt [--chunk 2048] [--window 256 --stride 128]

tasks: a checkpoint trained on a synthetic task (tasks.py, configs/induction_heads.ini, ...) is scored on fresh
examples of the same task at every length given (the extrapolation of the paper's Table 11): the accuracy over
the answer tokens (argmax). Each sequence is read by chunked prefill (the parallel scan over at most 2^16 tokens
of the batch at a time, carried from chunk to chunk through the recurrent state), so memory stays constant
however long it is.

perplexity: the loss of a whole text read as one sequence, chunk by chunk through the recurrent state, so every
token is predicted from everything before it, exactly, in memory that does not grow with the text (what a model
with a fixed context window cannot do), and beside it the usual sliding-window estimate, which gives each token
at most --window tokens of context. In nats and bits per token (per byte for the byte tokenizer), perplexity,
and tokens/s.
"""
import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import read_checkpoint
from cli import die, int_list, pick_device, read_text
from data import DataConfig, DataError, load_dataset
from pretrained import load_checkpoint, load_model
from tasks import IGNORE, check, make_batch

PREFILL_TOKENS = 2**16  # batch * length of one prefill chunk


@torch.inference_mode()
def answer_logits(model, x, scored):
    """Logits (b, len(scored), vocab) at the positions ``scored`` (sorted) of x (b, l). The tokens before the first
    scored one are read by chunked prefill (at most PREFILL_TOKENS over the batch at a time, carried through the
    state), the rest by one forward from that state, whose logits are kept at the scored positions: memory does
    not grow with l beyond the inputs. Equal to model(x)[:, scored] (tests/test_evaluate.py)."""
    first = scored[0]
    if first == 0:
        raise ValueError("position 0 cannot be scored after a prefill")
    cache = model.allocate_cache(x.shape[0], device=x.device)
    model.prefill(x[:, :first], cache, chunk_size=max(1, PREFILL_TOKENS // x.shape[0]))
    return model(x[:, first:], cache=cache)[:, [t - first for t in scored]]


def accuracy_at(model, task, vocab_size, n_tokens, seq_len, examples, batch_size=256, seed=0):
    """Fraction of answer tokens predicted right (argmax) over ``examples`` fresh examples of length seq_len."""
    generator = torch.Generator().manual_seed(seed)
    right = total = 0
    for start in range(0, examples, batch_size):
        x, y = make_batch(task, vocab_size, n_tokens, min(batch_size, examples - start), seq_len, generator)
        scored = (y[0] != IGNORE).nonzero()[:, 0].tolist()  # the same positions in every row
        guess = answer_logits(model, x, scored)[..., :vocab_size].argmax(-1)
        right += (guess == y[:, scored]).sum().item()
        total += guess.numel()
    return right / total


def describe(config):
    """A checkpoint's selectivity in words, for tables and legends: "Mamba (S6)", "LTI (S4D-real)", "Δ, B"..."""
    on = [name for name in ("delta", "B", "C", "A") if config.get(f"selective_{name}", name != "A")]
    if on == ["delta", "B", "C"]:
        return "Mamba (S6)"
    if not on:
        return "LTI (S4D-real)"
    return "selective " + ", ".join("Δ" if name == "delta" else name for name in on)


def plot(results, path):
    """Accuracy against length (log scale), one line per checkpoint, the training length marked."""
    title = f"{results[0]['task'].replace('_', ' ')}: accuracy by test length"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    for run in results:
        ax.plot([r["length"] for r in run["results"]], [100 * r["accuracy"] for r in run["results"]], "o-",
                ms=4, label=f"{run['label']} (trained at {run['trained_at']})")
    for x in sorted({run["trained_at"] for run in results}):
        ax.axvline(x, color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel="test sequence length", ylabel="accuracy (%)", ylim=(-2, 102), title=title)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


MIN_EXAMPLES = 8  # --max-tokens never cuts a length to fewer examples than this


def examples_at(length, examples, max_tokens=None):
    """How many examples to score at a length: ``examples``, cut to max_tokens // length (but not below
    MIN_EXAMPLES) when max_tokens is given, so that the longest lengths cost about max_tokens tokens each."""
    if max_tokens is None:
        return examples
    return min(examples, max(MIN_EXAMPLES, max_tokens // length))


def task_accuracy(args):
    """python evaluate.py tasks: each checkpoint's accuracy at each length, printed, and to --json / --plot."""
    lengths = int_list(args.lengths, "--lengths")
    if args.examples < 1:
        die(f"--examples must be >= 1, got {args.examples}")
    if args.max_tokens is not None and args.max_tokens < 1:
        die(f"--max-tokens must be >= 1, got {args.max_tokens}")
    runs = []
    for path in args.ckpt:
        model, _, ckpt = load_checkpoint(path)
        data = ckpt["config"]["data"]
        if data.get("task", "none") == "none":
            die(f"--ckpt {path}: trained on text, not on a task; train one with configs/selective_copying.ini "
                "or configs/induction_heads.ini")
        task, vocab, k = data["task"], data["task_vocab"], data["task_tokens"]
        for length in lengths:
            problem = check(task, vocab, k, length)
            if problem:
                die(f"--lengths {length}: {problem.replace('seq_len', 'the length')}")
        trained = ckpt["config"]["training"]
        label = f"{describe(ckpt['config']['model'])}, {ckpt['step']:,} steps, seed {trained['seed']}"
        run = {"ckpt": path, "task": task, "label": label,
               "trained_at": trained["seq_len"], "examples": args.examples, "results": []}
        print(f"{path}: {run['label']} on {task}, trained at length {run['trained_at']}")
        for length in lengths:
            examples = examples_at(length, args.examples, args.max_tokens)
            started = time.perf_counter()
            acc = accuracy_at(model, task, vocab, k, length, examples, seed=args.seed)
            seconds = time.perf_counter() - started
            run["results"].append({"length": length, "accuracy": acc, "seconds": seconds, "examples": examples})
            print(f"  length {length:>8}: accuracy {100 * acc:6.2f}%  ({examples} examples, {seconds:.1f} s)")
            sys.stdout.flush()
        runs.append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")


def plot_saved(args):
    """python evaluate.py plot: the runs of several `tasks --json` files in one figure (evaluations of different
    checkpoints can then run in separate processes, one core each)."""
    runs = []
    for path in args.json:
        try:
            with open(path) as f:
                runs += json.load(f)
        except (OSError, ValueError) as e:
            die(f"{path}: not a file written by evaluate.py tasks --json ({e})")
    plot(runs, args.out)
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------
# Perplexity of a text


@torch.inference_mode()
def document_nats(model, ids, chunk, bar=None):
    """Sum of -log p(ids[t] | ids[:t]) over t = 1 .. L-1 (nats) for one document ids (L,), read as one sequence:
    chunk tokens at a time through the model, the recurrent state carried from each chunk to the next, so the
    context of every token is the whole document before it and memory does not grow with L."""
    cache, total = model.allocate_cache(1, device=ids.device), 0.0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start:min(start + chunk, len(ids) - 1)]
        logits = model(x[None], cache=cache)[0]
        total += F.cross_entropy(logits.float(), ids[start + 1:start + 1 + len(x)], reduction="sum").item()
        if bar is not None:
            bar.update(len(x))
    return total


@torch.inference_mode()
def sliding_window_nats(model, ids, window, stride, batch=16, bar=None):
    """The usual estimate when a model has a fixed context: windows of ``window`` tokens every ``stride``
    tokens, each scoring only the tokens the window before it did not (so every token t >= 1 is scored once,
    with window - stride to window - 1 tokens of context after the first window). Sum of nats over t = 1 .. L-1."""
    spans, scored_until = [], 1  # (begin, end, first scored position) of each window
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == len(ids):
            break
    total = 0.0
    for i in range(0, len(spans), batch):
        group = spans[i:i + batch]
        width = max(end - begin for begin, end, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long, device=ids.device)
        y = torch.full_like(x, IGNORE)
        for row, (begin, end, first) in enumerate(group):
            x[row, :end - begin] = ids[begin:end]  # right padding: the causal model never reads it
            y[row, first - begin - 1:end - begin - 1] = ids[first:end]
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
        if bar is not None:
            bar.update(sum(end - first for _, end, first in group))
    return total


def perplexity(args):
    """python evaluate.py perplexity: the whole-document loss and the sliding-window estimate of one text."""
    model, tokenizer = load_model(args.ckpt, args.pretrained, pick_device(args.device, "--device"))
    device = next(model.parameters()).device
    if args.val:
        ckpt = read_checkpoint(args.ckpt)
        try:
            tokens = load_dataset(DataConfig(**ckpt["config"]["data"]), tokenizer).val
        except DataError as e:
            die(f"--val: {e}")
        source = f"the held-out split of {args.ckpt}'s corpus"
    else:
        try:
            tokens = tokenizer.encode_array(read_text(args.text_file, "--text-file"))
        except ValueError as e:
            die(f"--text-file {args.text_file}: {e}")
        source = args.text_file
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)
    if len(ids) < 2:
        die(f"{source}: {len(ids)} token(s); perplexity needs at least two")
    n, unit = len(ids) - 1, tokenizer.unit
    print(f"{source}: {len(ids):,} {unit}s, {n:,} of them predicted")
    estimates = [(f"whole document, one sequence carried through the state ({args.chunk} tokens at a time)",
                  lambda bar: document_nats(model, ids, args.chunk, bar))]
    if args.window:
        estimates.append((f"sliding window of {args.window} tokens, stride {args.stride}",
                          lambda bar: sliding_window_nats(model, ids, args.window, args.stride, bar=bar)))
    for name, measure in estimates:
        started = time.perf_counter()
        with tqdm(total=n, unit=unit, unit_scale=True, leave=False, desc=name.split(",")[0]) as bar:
            nats = measure(bar) / n
        seconds = time.perf_counter() - started
        print(f"{name}: {nats:.4f} nats per {unit}, {nats / math.log(2):.4f} bits per {unit}, perplexity "
              f"{math.exp(nats):.3f}; {seconds:.1f} s, {n / seconds:,.0f} {unit}s/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate trained models.")
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("tasks", help="accuracy of task checkpoints at other sequence lengths")
    t.add_argument("--ckpt", nargs="+", required=True, help="checkpoints trained on a task config")
    t.add_argument("--lengths", default="64,128,256,512,1024,2048,4096,8192,16384",
                   help="comma-separated sequence lengths to evaluate")
    t.add_argument("--examples", type=int, default=256, help="examples per length (default 256)")
    t.add_argument("--max-tokens", type=int, help=f"at most this many tokens a length: fewer examples at the "
                   f"longest lengths (never under {MIN_EXAMPLES})")
    t.add_argument("--seed", type=int, default=0, help="seed of the evaluation examples (default 0)")
    t.add_argument("--json", help="also write the accuracies and timings to this file")
    t.add_argument("--plot", help="also draw accuracy against length into this PNG")
    g = commands.add_parser("plot", help="draw the accuracies of saved `tasks --json` files in one figure")
    g.add_argument("json", nargs="+", help="files written by evaluate.py tasks --json")
    g.add_argument("--out", required=True, help="the PNG to write")
    p = commands.add_parser("perplexity", help="loss and perplexity of a text, whole and by sliding window")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by main.py (default: out/ckpt.pt)")
    weights.add_argument("--pretrained", metavar="DIR_OR_NAME", help="a published Mamba directory or hub name")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text-file", help="the UTF-8 text to score, as one document")
    text.add_argument("--val", action="store_true", help="the held-out split of the checkpoint's own corpus")
    p.add_argument("--chunk", type=int, default=2048, help="tokens read at a time by the whole-document pass")
    p.add_argument("--window", type=int, default=256, help="the sliding window (0: skip that estimate)")
    p.add_argument("--stride", type=int, default=128, help="tokens between sliding windows (default 128)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    args = parser.parse_args(argv)
    if args.command == "tasks":
        return task_accuracy(args)
    if args.command == "plot":
        return plot_saved(args)
    for flag, value in (("--chunk", args.chunk), ("--stride", args.stride)):
        if value < 1:
            die(f"{flag} must be >= 1, got {value}")
    if args.window and not 1 <= args.stride <= args.window:
        die(f"--stride must be in [1, --window = {args.window}], got {args.stride}")
    if args.val and args.pretrained:
        die("--val reads a training checkpoint's corpus: use it with --ckpt")
    perplexity(args)


if __name__ == "__main__":
    main()
