"""The paper's synthetic tasks (section 4.1), generated on the fly, and their evaluation at any length.

Both tasks need a model to *select*: to keep some tokens in its state and ignore others depending on what
they are, not where they are. A linear time-invariant SSM (S4) cannot do that: its convolution kernel is the
same for every input. They are the paper's evidence that selection is what makes Mamba work.

Selective Copying (section 4.1.1, Figure 2). A sequence of noise tokens with K data tokens at random positions,
then K marker tokens; at the i-th marker the model must output the i-th data token. The random spacing is what
separates it from plain Copying, which a time-invariant convolution solves by a fixed shift.

    ids      0 = noise "."   1 = marker "|"   2 .. vocab_size - 1 = data "a", "b", ...
    x        . . a . . . c b . . . a . . . | | | |          (length seq_len; the last K are markers)
    y        - - - - - - - - - - - - - - - a c b a          (- = not scored)

Induction Heads (section 4.1.2). Random tokens; a trigger token appears once somewhere in the sequence, followed
by a token; the trigger appears again at the very end, where the model must output the token that followed it
the first time (associative recall: "Harry Potter ... Harry" -> "Potter").

    ids      0 .. vocab_size - 2 = ordinary "a", "b", ...   vocab_size - 1 = trigger "*"
    x        d a f * k c b e a ... g d *
    y        - - - - - - - - - ... - - k

A batch is (x, y), both (b, l) int64; y holds IGNORE (-100, the ignore_index of F.cross_entropy) wherever
nothing is scored, so the trainer's loss and accuracy count only the answers. Examples come from a
torch.Generator, so a seed fixes them and a checkpoint can save the stream's position.

    python tasks.py --ckpt out/induction_heads/ckpt.pt [more checkpoints] --lengths 64,256,1024,4096,16384,65536
                    [--json results.json] [--plot accuracy.png]

evaluates trained checkpoints at other lengths (the extrapolation of the paper's Table 11): the sequence
is prefilled with the parallel scan (at most 2^16 tokens over the batch), then fed one token at a time
through the recurrent step, so memory stays constant however long it is.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch

from checkpoint import die, load_checkpoint
from data import Tokenizer

TASKS = ("selective_copying", "induction_heads")
IGNORE = -100
NOISE, MARKER = 0, 1  # selective copying's special ids; the trigger of induction heads is vocab_size - 1
PREFILL_TOKENS = 2**16  # evaluation: batch * length scanned in parallel before switching to the recurrent step


def check(task, vocab_size, n_tokens, seq_len):
    """One sentence saying why this task cannot be built with these sizes, or None when it can."""
    if task == "selective_copying":
        if vocab_size < 3:
            return f"selective_copying needs task_vocab >= 3 (noise, marker, one data token), got {vocab_size}"
        if seq_len < 2 * n_tokens:
            return (f"selective_copying needs seq_len >= 2 * task_tokens = {2 * n_tokens} "
                    f"(room for the data tokens, then as many markers), got {seq_len}")
    elif task == "induction_heads":
        if vocab_size < 2:
            return f"induction_heads needs task_vocab >= 2 (one ordinary token and the trigger), got {vocab_size}"
        if seq_len < 3:
            return f"induction_heads needs seq_len >= 3 (trigger, its token, trigger), got {seq_len}"
    else:
        return f"unknown task {task!r}; expected one of {', '.join(TASKS)}"
    return None


def selective_copying(batch_size, seq_len, vocab_size=16, n_tokens=16, generator=None):
    """(x, y), each (b, seq_len): K = n_tokens data tokens at sorted random positions among the first
    seq_len - K, noise elsewhere, then K markers where y holds the data tokens in order."""
    b, K, room = batch_size, n_tokens, seq_len - n_tokens
    data = torch.randint(2, vocab_size, (b, K), generator=generator)
    # K distinct positions per row: the K smallest of `room` random keys, sorted so data keeps its order
    positions = torch.rand(b, room, generator=generator).topk(K, dim=1, largest=False).indices.sort(dim=1).values
    x = torch.full((b, seq_len), NOISE, dtype=torch.long)
    x.scatter_(1, positions, data)
    x[:, room:] = MARKER
    y = torch.full_like(x, IGNORE)
    y[:, room:] = data
    return x, y


def induction_heads(batch_size, seq_len, vocab_size=16, generator=None):
    """(x, y), each (b, seq_len): ordinary tokens, the trigger at a random position p < seq_len - 2 followed by
    the answer, the trigger again at the end, where y holds the answer."""
    trigger = vocab_size - 1
    x = torch.randint(0, trigger, (batch_size, seq_len), generator=generator)
    p = torch.randint(0, seq_len - 2, (batch_size, 1), generator=generator)
    rows = torch.arange(batch_size)[:, None]
    x[rows, p] = trigger
    x[:, -1] = trigger
    y = torch.full_like(x, IGNORE)
    y[:, -1] = x[rows, p + 1][:, 0]
    return x, y


def make_batch(task, vocab_size, n_tokens, batch_size, seq_len, generator=None):
    """A batch of the named task: (x, y) int64 (b, seq_len), y = IGNORE where nothing is scored."""
    if task == "selective_copying":
        return selective_copying(batch_size, seq_len, vocab_size, n_tokens, generator)
    return induction_heads(batch_size, seq_len, vocab_size, generator)


class TaskTokenizer(Tokenizer):
    """Ids <-> the symbols drawn in the docstring above, so a task example prints and reads as a string."""

    unit = "token"

    def __init__(self, task, vocab_size):
        self.task, self.vocab_size = task, vocab_size
        letters = [chr(ord("a") + i) if i < 26 else chr(0x3B1 + i - 26) for i in range(vocab_size)]  # then α, β, ...
        self.symbols = ".|" + "".join(letters[:vocab_size - 2]) if task == "selective_copying" \
            else "".join(letters[:vocab_size - 1]) + "*"

    def encode_array(self, text):
        unknown = set(text) - set(self.symbols)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]!r} is not a symbol of {self.task} (symbols: {self.symbols})")
        return np.array([self.symbols.index(c) for c in text], dtype=np.int64)

    def decode(self, ids):
        return "".join(self.symbols[int(i)] for i in ids)

    def state_dict(self):
        return {"kind": "task", "task": self.task, "vocab_size": self.vocab_size}

    def token_class(self, token_id):
        """What a token is for the task: noise, marker or data (Selective Copying); trigger or ordinary."""
        if self.task == "selective_copying":
            return {NOISE: "noise", MARKER: "marker"}.get(int(token_id), "data")
        return "trigger" if int(token_id) == self.vocab_size - 1 else "ordinary"


# ----------------------------------------------------------------------------------------------------
# Evaluation at any length


@torch.inference_mode()
def answer_logits(model, x, scored):
    """Logits (b, len(scored), vocab) at the positions ``scored`` (sorted) of x (b, l), computed by prefilling
    at most PREFILL_TOKENS // b tokens with the parallel scan and stepping the recurrence through the rest:
    memory does not grow with l beyond the inputs. Equal to model(x)[:, scored] (tests/test_tasks.py)."""
    first = scored[0]
    if first == 0:
        raise ValueError("position 0 cannot be scored after a prefill")
    cache = model.allocate_cache(x.shape[0], device=x.device)
    p = min(first, max(1, PREFILL_TOKENS // x.shape[0]))
    logits, out = model.prefill(x[:, :p], cache), []
    wanted = set(scored)
    for t in range(p, x.shape[1]):
        logits = model.step(x[:, t], cache)
        if t in wanted:
            out.append(logits)
    return torch.stack(out, dim=1)


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
    try:
        lengths = [int(v) for v in args.lengths.split(",")]
    except ValueError:
        die(f"--lengths must be comma-separated integers, got {args.lengths!r}")
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
