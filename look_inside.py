"""Look inside a trained model: what the selection (Δ, B, C) does on a text, layer by layer.

    python look_inside.py --ckpt out/ckpt.pt [--text TEXT | --text-file F | --ids 3,1,4 | --task-example SEED]
                          [--out assets/delta.png] [--json delta.json]

Runs the text through the model once and records, for every layer, the numbers its selective scan uses:
Δ (l, d_inner), B and C (l, n), A (d_inner, n). Each channel's state evolves as

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t        (A < 0, so 0 < exp(Δ_t A) < 1)

so Δ_t decides, per token, how much of the state survives (exp(Δ_t A) near 1 for a small Δ_t: the token is
mostly ignored) and how strongly the token is written in (a large Δ_t resets the state towards the token).
For a Mamba-2 model (one Δ per head, a scalar A per head) the same is drawn with heads in place of channels.
The figure shows per layer: mean Δ over channels for each token, coloured over the text; the norms of B_t and
C_t (how strongly the token is written into / read from the state); and the fraction of the state that survives
the step, the mean over channels and state of exp(Δ_t A). The text summary lists the tokens with the largest
and smallest mean Δ and the characters whose Δ is largest on average. --json writes, per layer, the per-token
lists delta (mean over channels), B_norm, C_norm and survival, and the summary; "tokens" holds each token's text.

The numbers are captured with a forward hook on each mixer's activation (its output u is the scan's input) and
passed through the mixer's own MambaMixer.ssm_params, so they are the model's, not a re-implementation.
"""
import argparse
import json
import sys
import unicodedata

import matplotlib

matplotlib.use("Agg")  # draw into a file, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from cli import die, encode, int_list, read_text  # noqa: E402
from mamba2 import Mamba2Mixer  # noqa: E402
from pretrained import load_checkpoint  # noqa: E402
from tasks import check, make_batch, trigger  # noqa: E402

DEFAULT_TEXT = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
                '    for _ in range(n):\n        a, b = b, a + b\n    return a\n')
COLUMNS = 64  # the text is wrapped at newlines and at this many tokens per row in the heatmaps
SHOWN = {" ": "␣", "\n": "↵", "\t": "⇥", "": "·"}  # how invisible tokens are drawn ("": part of a character)


@torch.no_grad()
def capture(model, ids):
    """ids (1, l) int64 -> one dict per layer, all float32: delta (l, k) = Δ after softplus, k = d_inner channels
    (Mamba-1) or heads (Mamba-2); B and C (l, n) (Mamba-2: (l, g n), its groups side by side), or the fixed
    (d_inner, n) matrices of a non-selective ablation; A (k, n) (Mamba-2: (heads, 1)); decay_step (l, k), the
    Δ_t A_scale_t in exp(Δ_t A_scale_t A) (= delta unless A is selective). Exactly what the layer's scan receives:
    the mixer's own code on the inputs forward hooks read (its activation's output; Mamba-2: and in_proj's)."""
    mixers = [layer.mixer for layer in model.backbone.layers]
    seen = {}  # (layer index, "act" or "in_proj") -> that module's output

    def keeper(key):
        def hook(module, args, output):  # returns None: the forward pass goes on unchanged
            seen[key] = output
        return hook

    hooks = [getattr(m, name).register_forward_hook(keeper((i, name)))
             for i, m in enumerate(mixers) for name in ("act", "in_proj")]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [(_mamba2_numbers if isinstance(m, Mamba2Mixer) else _mamba1_numbers)(m, seen[i, "act"], seen[i, "in_proj"])
            for i, m in enumerate(mixers)]


def _mamba1_numbers(mixer, u, _):
    p = mixer.ssm_params(rearrange(u, "b l d -> b d l"))  # the scan's layout: dt (1, d_inner, l), B and C (1, n, l)
    delta = rearrange(F.softplus(p["dt"].float() + p["dt_bias"][:, None])[0], "d l -> l d")  # as the scan does
    B, C = (rearrange(p[k][0].float(), "n l -> l n") if mixer.selective[k] else p[k].detach().float()
            for k in ("B", "C"))
    step = delta if p["A_scale"] is None else delta * rearrange(p["A_scale"][0], "d l -> l d")
    return {"delta": delta, "B": B, "C": C, "A": p["A"], "decay_step": step,
            "fixed": [k for k in ("B", "C") if not mixer.selective[k]]}


def _mamba2_numbers(mixer, xBC, projected):
    delta = mixer._step_size(projected[0, :, -mixer.nheads:])                  # (l, heads), as forward computes it
    _, B, C = mixer._split(xBC[0])                                             # (l, g, n) each
    return {"delta": delta, "B": rearrange(B, "l g n -> l (g n)"), "C": rearrange(C, "l g n -> l (g n)"),
            "A": -torch.exp(mixer.A_log.float())[:, None], "decay_step": delta, "fixed": []}


def per_token(layers):
    """The plotted statistics, per layer a dict of (l,) tensors: mean Δ over channels, |B_t|, |C_t| (L2 over n; for
    a fixed matrix, its rows' mean norm at every token), and survival = mean over (d_inner, n) of exp(Δ_t A), the
    fraction of the state that survives step t (exp(Δ_t A_t) with a selective A)."""
    out = []
    for L in layers:
        l = L["delta"].shape[0]
        norm = {k: L[k].norm(dim=-1).mean().expand(l) if k in L["fixed"] else L[k].norm(dim=-1) for k in ("B", "C")}
        out.append({"delta": L["delta"].mean(-1), "B_norm": norm["B"], "C_norm": norm["C"],
                    "survival": torch.exp(L["decay_step"][:, :, None] * L["A"]).mean((1, 2))})
    return out


def token_labels(tokenizer, ids):
    """The text of each token (list of l str). A byte token that only starts a UTF-8 character gets "" (the
    character is shown on its last byte); a byte that can never be valid gets U+FFFD."""
    *labels, end = tokenizer.decode_pieces(ids)
    labels[-1] += end  # a character cut off at the end
    return labels


def shown(label, token_id):
    """What a token's cell shows: its character, a visible sign for whitespace, or its id for control tokens."""
    if label in SHOWN:
        return SHOWN[label]
    if len(label) == 1 and unicodedata.category(label)[0] == "C":
        return str(token_id)
    return label


def context(labels, t, left=6):
    """Token t in brackets after the text before it (the model is causal: Δ_t depends on tokens 0..t only)."""
    visible = [SHOWN.get(label, label) if label != " " else label for label in labels[max(0, t - left):t + 1]]
    return "".join(visible[:-1]) + f"[{visible[-1]}]"


HORIZONS = (2**12, 2**16, 2**20)  # retention lengths the memory summary counts state entries against


def memory_horizons(layer, positions):
    """The e-folding horizon of every state entry, in tokens, over the tokens at ``positions``: 1 / mean_t Δ_t |A|
    ((d_inner, n); Mamba-2 (heads, 1)). A value written into an entry keeps exp(-L / horizon) of itself after L
    such tokens: the entries that can carry a token across 2^20 of them need a horizon of that order."""
    rate = layer["decay_step"][positions].mean(0)[:, None] * layer["A"].abs()
    return 1 / rate


def summarize(labels, stats, k=5, classes=None, layers=None, between=None):
    """Per layer: the k tokens with the largest and smallest mean Δ as (position, Δ), the mean Δ per character
    (characters seen at least twice), and overall means; with classes (a task's kind of each token: noise, data,
    ...), the mean Δ per class and, for Selective Copying, its data/noise ratio; with layers (capture()'s), the
    memory of the state over ``between`` (positions; for Induction Heads, those after the token to remember and
    before the query), else over the most common kind of token (all tokens without classes): its longest horizon
    and how many entries outlast each of HORIZONS (memory_horizons). Returns a list of dicts (JSON-able)."""
    if between:
        filler, positions = "in-between", between
    else:
        filler = max(set(classes), key=classes.count) if classes else "token"
        positions = [t for t in range(len(labels)) if not classes or classes[t] == filler]
    out = []
    for i, s in enumerate(stats):
        delta = s["delta"]
        order = delta.argsort(descending=True).tolist()
        by_char = {}
        for t, label in enumerate(labels):
            by_char.setdefault(label, []).append(delta[t].item())
        by_char = {c: sum(v) / len(v) for c, v in by_char.items() if len(v) >= 2 and c}
        out.append({"largest": [(t, delta[t].item()) for t in order[:k]],
                    "smallest": [(t, delta[t].item()) for t in order[::-1][:k]],
                    "by_char": dict(sorted(by_char.items(), key=lambda kv: -kv[1])),
                    "mean_delta": delta.mean().item(), "mean_survival": s["survival"].mean().item(),
                    "mean_B_norm": s["B_norm"].mean().item(), "mean_C_norm": s["C_norm"].mean().item()})
        if classes:
            by_class = {c: delta[[t for t, k in enumerate(classes) if k == c]].mean().item()
                        for c in sorted(set(classes))}
            out[-1]["by_class"] = by_class
            if {"data", "noise"} <= set(by_class):
                out[-1]["data_noise_ratio"] = by_class["data"] / by_class["noise"]
        if layers:
            horizon = memory_horizons(layers[i], positions)
            out[-1]["memory"] = {"over": filler, "longest": horizon.max().item(), "entries": horizon.numel(),
                                 "outlasting": {str(h): int((horizon > h).sum()) for h in HORIZONS}}
    return out


def print_summary(labels, summary, file=None):
    for i, s in enumerate(summary):
        print(f"layer {i}: mean Δ {s['mean_delta']:.4g}, state surviving a step {s['mean_survival']:.3f}, "
              f"|B| {s['mean_B_norm']:.3g}, |C| {s['mean_C_norm']:.3g}", file=file)
        for name in ("largest", "smallest"):
            tokens = "  ".join(f"\"{context(labels, t)}\" {d:.3g}" for t, d in s[name])
            print(f"  {name} Δ: {tokens}", file=file)
        top = ", ".join(f"{c!r} {d:.3g}" for c, d in list(s["by_char"].items())[:5])
        print(f"  characters with the largest mean Δ: {top or '(none seen twice)'}", file=file)
        if "by_class" in s:
            ratio = f"; data/noise ratio {s['data_noise_ratio']:.3g}" if "data_noise_ratio" in s else ""
            print("  mean Δ by kind of token: " + ", ".join(f"{c} {d:.3g}" for c, d in s["by_class"].items())
                  + ratio, file=file)
        if "memory" in s:
            m = s["memory"]
            counts = ", ".join(f"{n} beyond {int(h):,}" for h, n in m["outlasting"].items())
            print(f"  memory over {m['over']} tokens (1/e horizon, 1 / mean Δ|A|): longest {m['longest']:,.0f} "
                  f"tokens; of {m['entries']:,} state entries {counts}", file=file)


def grid(cells):
    """Token positions in the wrapped text: a new row after a newline or after COLUMNS tokens. -> [(row, col)]."""
    row, col, where = 0, 0, []
    for cell in cells:
        if col == COLUMNS:
            row, col = row + 1, 0
        where.append((row, col))
        col += 1
        if cell == SHOWN["\n"]:
            row, col = row + 1, 0
    return where


def draw(cells, stats, path, title):
    """Per layer, a heatmap of mean Δ over the wrapped text (cells: what each token shows) and a plot of |B_t|,
    |C_t| and the surviving fraction against the token position. Writes the PNG to path."""
    where = grid(cells)
    rows = where[-1][0] + 1
    heights = [r for _ in stats for r in (0.22 * rows + 0.5, 1.7)]
    fig, axes = plt.subplots(2 * len(stats), 1, figsize=(10, sum(heights) + 0.6), layout="constrained",
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    fig.suptitle(title, fontsize=11)
    for i, s in enumerate(stats):
        heat, lines = axes[2 * i, 0], axes[2 * i + 1, 0]
        values = torch.full((rows, COLUMNS), float("nan"))
        for (r, c), d in zip(where, s["delta"].tolist()):
            values[r, c] = d
        image = heat.imshow(values.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        low, high = image.get_clim()
        for (r, c), cell, d in zip(where, cells, s["delta"].tolist()):
            bright = (d - low) / max(high - low, 1e-12) > 0.6  # dark ink on the light end of the colour map
            heat.text(c, r, cell, ha="center", va="center", fontsize=7 if len(cell) == 1 else 5,
                      family="DejaVu Sans Mono", color="black" if bright else "white", parse_math=False)
        heat.set(xticks=[], yticks=[], title=f"layer {i}: Δ averaged over channels (Mamba-2: heads), per token")
        fig.colorbar(image, ax=heat, fraction=0.03, pad=0.01, label="mean Δ")
        t = range(len(cells))
        lines.plot(t, s["B_norm"].numpy(), lw=1, label="|B_t|: how strongly the token is written into the state")
        lines.plot(t, s["C_norm"].numpy(), lw=1, label="|C_t|: how strongly the state is read out")
        lines.set(xlim=(-0.5, len(cells) - 0.5), ylabel="norm", xlabel="token position" * (i == len(stats) - 1))
        kept = lines.twinx()
        kept.plot(t, s["survival"].numpy(), lw=1, color="black", label="state surviving the step: mean exp(Δ_t A)")
        kept.set_ylabel("surviving")
    handles = lines.get_legend_handles_labels()[0] + kept.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def look_inside(ckpt, text=None, ids=None, out="delta.png", json_path=None, max_tokens=512, file=None,
                task_example=None, length=None):
    """Load ckpt, run text (or token ids, or with task_example = a seed, one example of the checkpoint's task, of
    ``length`` tokens, default its training length) through the model, write the PNG (and the JSON), print the
    summary to file (None: stdout).
    Returns {"ids", "labels", "layers": capture()'s list, "stats": per_token()'s list, "summary"}."""
    model, tokenizer, ckpt_dict = load_checkpoint(ckpt)
    if model.config.layer == "transformer":
        die(f"{ckpt} is the Transformer baseline, which has no step size Δ to show; give a Mamba checkpoint")
    if task_example is not None:
        data = ckpt_dict["config"]["data"]
        if data.get("task", "none") == "none":
            die(f"--task-example: {ckpt} was trained on text, not on a task")
        length = length or ckpt_dict["config"]["training"]["seq_len"]
        problem = check(data["task"], data["task_vocab"], data["task_tokens"], length)
        if problem:
            die(f"--length {length}: {problem.replace('seq_len', 'the length')}")
        x, _ = make_batch(data["task"], data["task_vocab"], data["task_tokens"], 1, length,
                          torch.Generator().manual_seed(task_example))
        ids = x[0].tolist()
    if ids is None:
        ids = encode(tokenizer, text, "the text")
    if not ids:
        die("--ids is empty: give at least one token")
    if max_tokens < 1:
        die(f"--max-tokens must be >= 1, got {max_tokens}")
    if any(not 0 <= i < model.config.vocab_size for i in ids):
        die(f"token ids must be in [0, {model.config.vocab_size})")
    if len(ids) > max_tokens:
        print(f"note: looking at the first {max_tokens} of {len(ids)} tokens (--max-tokens)", file=sys.stderr)
        ids = ids[:max_tokens]
    layers = capture(model, torch.tensor([ids]))
    stats = per_token(layers)
    labels = token_labels(tokenizer, ids)
    classes = [tokenizer.token_class(i) for i in ids] if hasattr(tokenizer, "token_class") else None
    between = None
    star = None if task_example is None or data["task"] != "induction_heads" else trigger(data["task_vocab"])
    if star in ids[:-1]:  # the memory that matters: over the tokens after the one to remember, before the query
        between = list(range(ids.index(star) + 2, len(ids) - 1)) or None
    summary = summarize(labels, stats, classes=classes, layers=layers, between=between)
    print_summary(labels, summary, file)
    draw([shown(lab, i) for lab, i in zip(labels, ids)], stats, out, f"{ckpt}: {len(ids)} tokens")
    print(f"wrote {out}", file=file)
    if json_path:
        numbers = [{name: s[name].tolist() for name in s} for s in stats]
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"ckpt": str(ckpt), "ids": ids, "tokens": labels,
                       "layers": [{**n, **m} for n, m in zip(numbers, summary)]}, f, ensure_ascii=False)
        print(f"wrote {json_path}", file=file)
    return {"ids": ids, "labels": labels, "layers": layers, "stats": stats, "summary": summary}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw Δ, B, C and the state's decay of a checkpoint on a text.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by main.py (default: out/ckpt.pt)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to look at (default: a short Python function)")
    source.add_argument("--text-file", help="read the text from this UTF-8 file")
    source.add_argument("--ids", help="comma-separated token ids, e.g. a task example that is not text")
    source.add_argument("--task-example", type=int, metavar="SEED",
                        help="one example of the checkpoint's task (Selective Copying, ...) drawn with this seed")
    parser.add_argument("--length", type=int, help="--task-example's length (default: the training length; a "
                        "long example measures the memory over many more tokens in between)")
    parser.add_argument("--out", default="delta.png", help="the PNG to write (default: delta.png)")
    parser.add_argument("--json", help="also write the per-token numbers and the summary to this JSON file")
    parser.add_argument("--max-tokens", type=int, default=512, help="look at the first this many tokens (512)")
    args = parser.parse_args(argv)
    text, ids = args.text, None
    if args.text_file:
        text = read_text(args.text_file, "--text-file")
    elif args.ids:
        ids = int_list(args.ids, "--ids")
    default = text is None and ids is None and args.task_example is None
    if args.length is not None and args.task_example is None:
        die("--length is the length of a --task-example; give --task-example SEED")
    look_inside(args.ckpt, DEFAULT_TEXT if default else text, ids, args.out, args.json, args.max_tokens,
                task_example=args.task_example, length=args.length)


if __name__ == "__main__":
    main()
