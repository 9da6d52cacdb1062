"""Evaluate task checkpoints at other sequence lengths: the extrapolation of the paper's Table 11.

    python evaluate.py --ckpt out/induction_heads/ckpt.pt [more checkpoints] --lengths 64,256,1024,4096,16384,65536
                       [--examples 256] [--json results.json] [--plot accuracy.png]

A checkpoint trained on a synthetic task (tasks.py, configs/induction_heads.ini, ...) is scored on fresh
examples of the same task at every length given: the accuracy over the answer tokens (argmax). Each sequence
is read by chunked prefill (the parallel scan over at most 2^16 tokens of the batch at a time, carried from chunk
to chunk through the recurrent state), so memory stays constant however long it is.
"""
import argparse
import json
import sys
import time

import torch

from cli import die, int_list
from pretrained import load_checkpoint
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


def plot(results, path, title):
    """Accuracy against length (log scale), one line per checkpoint, the training length marked."""
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Accuracy of task checkpoints at other sequence lengths.")
    parser.add_argument("--ckpt", nargs="+", required=True, help="checkpoints trained on a task config")
    parser.add_argument("--lengths", default="64,128,256,512,1024,2048,4096,8192,16384",
                        help="comma-separated sequence lengths to evaluate")
    parser.add_argument("--examples", type=int, default=256, help="examples per length (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation examples (default 0)")
    parser.add_argument("--json", help="also write the accuracies and timings to this file")
    parser.add_argument("--plot", help="also draw accuracy against length into this PNG")
    args = parser.parse_args(argv)
    lengths = int_list(args.lengths, "--lengths")
    if args.examples < 1:
        die(f"--examples must be >= 1, got {args.examples}")
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
        run = {"ckpt": path, "task": task, "label": describe(ckpt["config"]["model"]),
               "trained_at": ckpt["config"]["training"]["seq_len"], "examples": args.examples, "results": []}
        print(f"{path}: {run['label']} on {task}, trained at length {run['trained_at']}")
        for length in lengths:
            started = time.perf_counter()
            acc = accuracy_at(model, task, vocab, k, length, args.examples, seed=args.seed)
            seconds = time.perf_counter() - started
            run["results"].append({"length": length, "accuracy": acc, "seconds": seconds})
            print(f"  length {length:>8}: accuracy {100 * acc:6.2f}%  ({args.examples} examples, {seconds:.1f} s)")
            sys.stdout.flush()
        runs.append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(runs, args.plot, f"{runs[0]['task'].replace('_', ' ')}: accuracy by test length")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
