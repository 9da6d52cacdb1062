"""Compare finished training runs: their last validation figures side by side, and their loss curves in one PNG.

    python bench/compare_runs.py out/cmp/m1_lr3e-3_s1337 out/cmp/tf_lr1e-3_s1337 --png assets/baselines.png
    python bench/compare_runs.py out/cmp/t7_*                       # a shell pattern: every matching run

Each argument is a run's out_dir, as main.py leaves it: config.ini (the resolved config), log.csv (one row per
evaluation) and ckpt.pt. The first table has one row per run: the kind of model and its parameter count, the
settings that differ between the runs given, the last evaluation (step, validation loss in nats, bits per byte
or per character, accuracy: of the next token on text, of the answers on a task) and the wall-clock of
training (log.csv's elapsed_s, evaluations included). The second has one row per group of runs that differ
only in their seed: the mean and the spread (max - min) of the final loss.
With --png, the validation loss of every run against the step and against the wall-clock.
"""
import argparse
import configparser
import csv
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from cli import die  # noqa: E402
from mamba_config import MambaConfig  # noqa: E402
from pretrained import build_model  # noqa: E402

# Never what makes two runs different settings (the seed and folder), or shown in a column of its own.
NOT_SETTINGS = {("training", "out_dir"), ("training", "seed"), ("model", "layer")}


def read_run(folder: Path) -> dict:
    """config (section -> key -> text), log rows, parameter count; exits with one line if it is no finished run."""
    config = configparser.ConfigParser()
    config.optionxform = str  # keys as written (selective_B), not lowercased
    if not config.read(folder / "config.ini", encoding="utf-8") or not (folder / "log.csv").is_file():
        die(f"{folder} is not a run's out_dir (config.ini and log.csv missing); pass what main.py wrote as "
            "[training] out_dir")
    with open(folder / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        die(f"{folder}/log.csv has no evaluation yet")
    model = ckpt_model_config(folder)
    with torch.device("meta"):
        params = build_model(MambaConfig(**model)).num_params()
    settings = {(s, k): v for s in config.sections() for k, v in config[s].items()}
    return {"name": folder.name, "settings": settings, "rows": rows, "params": params, "layer": model["layer"]}


def ckpt_model_config(folder: Path) -> dict:
    """[model] as the run trained it (the checkpoint's, vocabulary included)."""
    ckpt = torch.load(folder / "ckpt.pt", map_location="cpu", weights_only=True)
    return ckpt["config"]["model"]


def bits_column(rows) -> str:
    return next(c for c in rows[0] if c.startswith("val_bits"))


def differing(runs) -> list:
    """The (section, key) whose value is not the same in every run, seeds, folders and the kind of model aside."""
    keys = sorted(set().union(*(r["settings"] for r in runs)) - NOT_SETTINGS)
    return [k for k in keys if len({r["settings"].get(k) for r in runs}) > 1]


def table(runs) -> list[str]:
    keys = differing(runs)
    bits = bits_column(runs[0]["rows"])
    head = ["run", "model", "parameters", *(k for _, k in keys), "seed", "step", "val loss (nats)",
            bits.replace("val_", "").replace("_", " "), "accuracy", "wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        last = r["rows"][-1]
        minutes, seconds = divmod(round(float(last["elapsed_s"])), 60)
        cells = [r["name"], r["layer"], f"{r['params']:,}", *(r["settings"].get(k, "") for k in keys),
                 r["settings"].get(("training", "seed"), ""), last["step"], f"{float(last['val_loss']):.4f}",
                 f"{float(last[bits]):.4f}", f"{float(last['val_accuracy']):.2%}",
                 f"{minutes} min {seconds:02d} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def seed_groups(runs) -> list[str]:
    """Mean and spread of the final validation loss over runs that differ only in their seed."""
    keys = [("model", "layer"), *differing(runs)]
    groups: dict = {}
    for r in runs:
        groups.setdefault(tuple(r["settings"].get(k, "") for k in keys), []).append(r)
    lines = ["| " + " | ".join(["runs", *(k for _, k in keys), "seeds", "mean val loss", "spread"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for values, members in groups.items():
        losses = [float(r["rows"][-1]["val_loss"]) for r in members]
        seeds = ", ".join(r["settings"].get(("training", "seed"), "") for r in members)
        lines.append("| " + " | ".join([", ".join(r["name"] for r in members), *values, seeds,
                                        f"{statistics.mean(losses):.4f}", f"{max(losses) - min(losses):.4f}"]) + " |")
    return lines


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in runs:
        steps = [int(row["step"]) for row in r["rows"]]
        minutes = [float(row["elapsed_s"]) / 60 for row in r["rows"]]
        loss = [float(row["val_loss"]) for row in r["rows"]]
        by_step.plot(steps, loss, marker=".", label=r["name"])
        by_time.plot(minutes, loss, marker=".", label=r["name"])
    by_step.set(xlabel="step", ylabel="validation loss (nats)", title="equal steps (equal tokens)")
    by_time.set(xlabel="wall-clock (minutes)", title="equal time on this machine")
    low = min(float(row["val_loss"]) for r in runs for row in r["rows"])
    by_step.set_ylim(low - 0.05, low + 1.0)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="out_dir of each finished run")
    parser.add_argument("--png", help="write the validation curves here")
    args = parser.parse_args(argv)
    runs = [read_run(Path(folder)) for folder in args.runs]
    print("\n".join(table(runs)) + "\n")
    print("\n".join(seed_groups(runs)))
    if args.png:
        plot(runs, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
