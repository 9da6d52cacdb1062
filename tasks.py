"""The paper's synthetic tasks (section 4.1), generated on the fly.

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
nothing is scored, so the trainer's loss and accuracy count only the answers ([data] task_targets = every
trains on every_position's targets instead: the answers and the next token everywhere else). Examples come from a
torch.Generator, so a seed fixes them and a checkpoint can save the stream's position.

evaluate.py measures a trained checkpoint on them at other lengths (the paper's Table 11).
"""
import torch

TASKS = ("selective_copying", "induction_heads")
IGNORE = -100
NOISE, MARKER = 0, 1  # selective copying's special ids; the trigger of induction heads is vocab_size - 1


def trigger(vocab_size):
    """Induction Heads' trigger id: the last of the vocabulary."""
    return vocab_size - 1


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
    star = trigger(vocab_size)
    x = torch.randint(0, star, (batch_size, seq_len), generator=generator)
    p = torch.randint(0, seq_len - 2, (batch_size, 1), generator=generator)
    rows = torch.arange(batch_size)[:, None]
    x[rows, p] = star
    x[:, -1] = star
    y = torch.full_like(x, IGNORE)
    y[:, -1] = x[rows, p + 1][:, 0]
    return x, y


def every_position(x, y):
    """The targets of a language-model loss on a task batch: y's answers where it has them, the next token of x
    at every other position (the last, with no next token, stays as y has it). The H3/safari generator behind
    the paper's tasks trains on these, where make_batch's y scores the answers alone."""
    targets = torch.full_like(y, IGNORE)
    targets[:, :-1] = x[:, 1:]
    return torch.where(y != IGNORE, y, targets)


def make_batch(task, vocab_size, n_tokens, batch_size, seq_len, generator=None):
    """A batch of the named task: (x, y) int64 (b, seq_len), y = IGNORE where nothing is scored."""
    if task == "selective_copying":
        return selective_copying(batch_size, seq_len, vocab_size, n_tokens, generator)
    return induction_heads(batch_size, seq_len, vocab_size, generator)
