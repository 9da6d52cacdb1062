"""Training: AdamW with the Mamba recipe, checkpoints that resume exactly, one or many processes.

    run = main.prepare(model_cfg, data_cfg, train_cfg)   # resolved once: model, tokenizer, batches
    train(run)                                           # build, restore, then the loop

``train`` takes any causal language model (ids (b, l) -> logits (b, l, >= vocab_size) with an
``optim_groups(weight_decay)`` method, as MambaLM has) and reads top to bottom: put the model on its
device and make the optimizer; restore a checkpoint when resuming; then the loop, where every step sets
the learning rate, takes one optimizer step, and now and then logs, evaluates and saves. What the loop
carries from step to step is one small object, ``Progress``.

One optimizer step (``_train_step``): for each of grad_accum micro-batches, loss = CE(model(x), y)
/ grad_accum and loss.backward() (gradients add up); clip the gradient's global norm; AdamW step
with lr = lr_at(step). The recipe is the paper's (appendix E.2): betas (0.9, 0.95), weight decay
0.1 on matrices only (``model.optim_groups``), clip 1.0, linear warm-up then cosine decay.

Exact resume: a run interrupted at step k and resumed computes the same numbers as one that never
stopped, because everything a step depends on is saved: weights, AdamW's moments, the step (the
learning rate is a pure function of it: no scheduler object), the state of the generator that picks
the training windows, the torch RNG states, and the running sums behind the logged train loss.
Ctrl-C only raises a flag read between steps, so a checkpoint never holds half a step.

Several processes (``torchrun``): each holds a replica (DistributedDataParallel averages the
gradients), draws its own batches (generator seeded with seed + rank) and evaluates its share of
the validation batches; only rank 0 writes files and prints.

Exit status: 0 done; 1 the loss became NaN/Inf (nothing saved, the last checkpoint stays);
2 bad input (e.g. --resume without a checkpoint); 130 interrupted (SIGINT/SIGTERM), after saving.
"""
import csv
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from checkpoint import CKPT_FORMAT, model_fingerprint, read_checkpoint, save_checkpoint
from cli import die, pick_device
from config import BETA, NON_NEGATIVE, POSITIVE, check_fields, must, option, write_config
from data import Batches
from tasks import IGNORE
from tokenizer import Tokenizer

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT (128 + 2)


@dataclass
class TrainConfig:
    """How to train (the ``[training]`` section of config.ini)."""

    out_dir: str = option("out", "folder for ckpt.pt, config.ini, log.csv and loss.png")
    init_from: str = option("", (
        "empty: random weights; else a pretrained directory or hub name to fine-tune: its weights, its "
        "architecture (every [model] key but scan is ignored) and its tokenizer (replacing [data] tokenizer)"))
    seed: int = option(1337, "seeds the weights, the training batches and the fixed validation batches")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "auto: CUDA when available, else Apple's MPS, else "
                                                                   "the CPU")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", (
        "autocast dtype of the matmuls (the scan stays float32); auto: bfloat16 on CUDA, else float32"))
    compile: bool = option(False, "torch.compile the model (slow start, faster steps on GPU)")
    batch_size: int = option(16, "sequences per micro-batch, per process", POSITIVE)
    seq_len: int = option(256, "tokens per training sequence", POSITIVE)
    grad_accum: int = option(1, "micro-batches whose gradients add up to one optimizer step", POSITIVE)
    max_steps: int = option(400, "optimizer steps to train for", POSITIVE)
    lr: float = option(3e-3, "peak learning rate, reached at the end of warm-up", POSITIVE)
    min_lr: float = option(3e-4, "floor of the cosine decay, reached at max_steps", NON_NEGATIVE)
    warmup_steps: int = option(40, "steps of linear learning-rate warm-up (a longer one is cut to max_steps)",
                               NON_NEGATIVE)
    weight_decay: float = option(0.1, "AdamW weight decay, applied to matrices only", NON_NEGATIVE)
    beta1: float = option(0.9, "AdamW beta1", BETA)
    beta2: float = option(0.95, "AdamW beta2", BETA)
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0: no clipping)", NON_NEGATIVE)
    eval_interval: int = option(50, "steps between evaluations", POSITIVE)
    eval_batches: int = option(20, "size of the fixed set of validation batches", POSITIVE)
    log_interval: int = option(10, "steps between progress-bar updates", POSITIVE)
    ckpt_interval: int = option(100, "steps between checkpoints (one is also written at the end)", POSITIVE)

    def __post_init__(self):
        check_fields(self)
        must(self, "min_lr", self.min_lr <= self.lr, f"<= lr = {self.lr}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up lr * (step + 1) / warmup, then half
    a cosine from lr down to min_lr at max_steps, and min_lr after that. A warm-up longer than the run is cut
    to the run (main.py says so)."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (cfg.max_steps - warmup)) if cfg.max_steps > warmup else 1.0
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------------
# Devices and processes


@dataclass
class Runtime:
    """Where this process computes: its device, autocast dtype, rank and the number of processes."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    def autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, self.dtype)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device and dtype; under torchrun (RANK and WORLD_SIZE set) join the process group."""
    device = pick_device(cfg.device, "[training] device =")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
    return Runtime(device, torch.bfloat16 if bf16 else torch.float32, rank, world)


def gather(obj, rt: Runtime) -> list:
    """``obj`` from every process, in rank order."""
    out = [obj] * rt.world
    if rt.world > 1:
        dist.all_gather_object(out, obj)
    return out


class StopFlag:
    """SIGINT/SIGTERM set a flag read between steps, so neither a step nor a checkpoint write is cut
    in half. The first signal restores the old handlers: a second Ctrl-C stops at once."""

    def __init__(self):
        self.raised, self._old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.raised = True
        self.__exit__()

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


# ----------------------------------------------------------------------------------------------------
# Loss and evaluation


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats of logits (b, l, V) against targets (b, l), computed in float32.
    Positions whose target is IGNORE (a task's unscored tokens) do not count."""
    return F.cross_entropy(rearrange(logits.float(), "b l v -> (b l) v"), rearrange(targets, "b l -> (b l)"),
                           ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, batches: list, rt: Runtime, vocab_size: int) -> tuple[float, float]:
    """(mean validation loss in nats per scored token, accuracy: the fraction of scored tokens that are
    the argmax of the logits) over ``batches``. Each process takes every world-th batch and the sums
    are all-reduced, so all processes return the same numbers."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=rt.device)  # (sum of losses, right answers, scored)
    for x, y in batches[rt.rank::rt.world]:
        with rt.autocast():
            logits = model(x.to(rt.device))
        y = y.to(rt.device)
        scored = y != IGNORE
        right = (logits[..., :vocab_size].argmax(-1) == y)[scored].sum()
        total += torch.stack([next_token_loss(logits, y).double() * scored.sum(), right, scored.sum()]).double()
    if rt.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[2]).item(), (total[1] / total[2]).item()


# ----------------------------------------------------------------------------------------------------
# Logs

COLUMNS = ("step", "train_loss", "val_loss", "val_bits", "val_ppl", "val_accuracy", "lr", "tokens_per_s",
           "elapsed_s")


def write_log(out_dir: Path, history: list, unit: str) -> None:
    """log.csv: one row per evaluation (val_bits is named bits_per_byte or bits_per_char there)."""
    tmp = out_dir / ".log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["val_bits_per_" + unit if c == "val_bits" else c for c in COLUMNS])
        writer.writerows([["" if row[c] is None else row[c] for c in COLUMNS] for row in history])
    os.replace(tmp, out_dir / "log.csv")


def plot_losses(out_dir: Path, history: list) -> None:
    """loss.png: train and validation loss against step (skipped when matplotlib is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # draw into a file, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4), layout="tight")
    trained = [row for row in history if row["train_loss"] is not None]
    ax.plot([r["step"] for r in trained], [r["train_loss"] for r in trained], label="train")
    ax.plot([r["step"] for r in history], [r["val_loss"] for r in history], "o-", ms=3, label="validation")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="baby_mamba")
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """What the trainer receives, resolved once (main.prepare)."""

    model: torch.nn.Module  # any causal LM on the CPU, initialised: ids (b, l) -> logits; optim_groups(wd)
    tokenizer: Tokenizer  # what the data was encoded with; saved with the weights
    batches: Batches  # training draws and the fixed validation set
    configs: dict  # {"model": ..., "data": ..., "training": TrainConfig}: written beside the checkpoints


@dataclass
class Progress:
    """What the loop carries from step to step; the first four fields are saved in checkpoints (metrics)."""

    step: int = 0
    history: list = field(default_factory=list)  # one row per evaluation, as in log.csv
    train_loss_sum: float = 0.0  # the train losses since the last evaluation (their mean is logged)
    train_loss_count: int = 0
    elapsed_s: float = 0.0  # seconds of training before this process (a resumed run's earlier ones)
    started: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0  # throughput since the last evaluation
    window_seconds: float = 0.0
    saved_step: int | None = None  # the step of the last checkpoint, for the NaN message

    def saved(self) -> dict:
        return {"history": self.history, "train_loss_sum": self.train_loss_sum,
                "train_loss_count": self.train_loss_count, "elapsed_s": self.elapsed()}

    def elapsed(self) -> float:
        return self.elapsed_s + time.perf_counter() - self.started


def train(run: Run, resume: bool = False) -> dict:
    """Train ``run.model`` as run.configs["training"] says (with ``resume``, continue from its checkpoint);
    return the last evaluation's row of log.csv with the token unit and the parameter count."""
    cfg = run.configs["training"]
    rt = setup_runtime(cfg)
    try:
        return _train(run, cfg, rt, resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(run: Run, cfg: TrainConfig, rt: Runtime, resume: bool) -> dict:
    # Build: the model on its device, the optimizer, the generator that draws this process's batches.
    raw = run.model.to(rt.device)
    optimizer = torch.optim.AdamW(raw.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=rt.device.type == "cuda")
    data_rng = torch.Generator().manual_seed(cfg.seed + rt.rank)  # each process reads other windows
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    # Restore: everything the next step depends on.
    progress = _restore(ckpt_path, run, optimizer, data_rng, rt) if resume else Progress()
    if rt.rank == 0:
        write_config(Path(cfg.out_dir) / "config.ini", run.configs)
        print(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters; device {rt.device} "
              f"({str(rt.dtype)[6:]}), {rt.world} process{'es' * (rt.world > 1)}; {run.batches}"
              + (f"; resuming at step {progress.step}" if resume else ""))
    fwd = torch.compile(raw) if cfg.compile else raw
    model = torch.nn.parallel.DistributedDataParallel(fwd) if rt.world > 1 else fwd
    val_batches = run.batches.validation(cfg.eval_batches, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world

    # The loop: learning rate, step, log, evaluate, save.
    with StopFlag() as stop, tqdm(total=cfg.max_steps, initial=progress.step, disable=rt.rank != 0, unit="step",
                                  dynamic_ncols=True) as bar:
        if progress.step == 0:
            _evaluate_and_log(fwd, val_batches, progress, run, rt, bar)  # the starting point of the curve
        while progress.step < cfg.max_steps:
            lr = lr_at(progress.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss, norm, stopping = _train_step(model, raw.parameters(), optimizer, run.batches, data_rng, cfg, rt, stop)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                bar.close()  # so the message starts on a line of its own
                last = ("no checkpoint was written yet" if progress.saved_step is None else
                        f"the last good checkpoint is {ckpt_path} (step {progress.saved_step})")
                die(f"step {progress.step + 1}: the loss is {loss} and the gradient norm {norm}; stopped without "
                    f"saving; {last}; try a lower lr or a smaller grad_clip", 1)
            progress.step += 1
            progress.train_loss_sum += loss
            progress.train_loss_count += 1
            progress.window_tokens += tokens_per_step
            progress.window_seconds += time.perf_counter() - t0
            bar.update(1)
            if progress.step % cfg.log_interval == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{progress.window_tokens / max(progress.window_seconds, 1e-9):,.0f}")
            if progress.step % cfg.eval_interval == 0 or progress.step == cfg.max_steps:
                _evaluate_and_log(fwd, val_batches, progress, run, rt, bar)
            if stopping or progress.step % cfg.ckpt_interval == 0 or progress.step == cfg.max_steps:
                _save(ckpt_path, raw, optimizer, data_rng, progress, run, rt)
            if stopping and progress.step < cfg.max_steps:
                if rt.rank == 0:
                    bar.write(f"interrupted: saved step {progress.step} to {ckpt_path}; continue with --resume",
                              sys.stderr)
                raise SystemExit(INTERRUPTED)
    return {**progress.history[-1], "unit": run.tokenizer.unit, "params": sum(p.numel() for p in raw.parameters())}


def _train_step(model, params, optimizer, batches: Batches, data_rng, cfg: TrainConfig, rt: Runtime, stop):
    """One optimizer step, skipped when the loss or the gradient is not finite. Returns (loss averaged
    over micro-batches and processes, gradient norm, whether any process was asked to stop)."""
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(cfg.grad_accum):
        x, y = (t.to(rt.device) for t in batches.train(data_rng))
        # DDP averages gradients on each backward; the first micro-batches only accumulate locally.
        sync = model.no_sync() if rt.world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
        with sync:
            with rt.autocast():
                loss = next_token_loss(model(x), y) / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
    # One all-reduce gives every process the same loss, finiteness verdict and stop decision.
    stats = torch.stack([loss_sum, norm.to(loss_sum), torch.tensor(float(stop.raised), device=rt.device)])
    if rt.world > 1:
        dist.all_reduce(stats)
    loss, norm, stopping = (stats / rt.world).tolist()
    if math.isfinite(loss) and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, stopping > 0


def _evaluate_and_log(model, val_batches, progress: Progress, run: Run, rt: Runtime, bar) -> None:
    """Evaluate, append a row to the history (log.csv, loss.png) and start a new throughput window."""
    val, accuracy = evaluate(model, val_batches, rt, run.tokenizer.vocab_size)
    count, unit = progress.train_loss_count, run.tokenizer.unit
    row = {"step": progress.step, "train_loss": progress.train_loss_sum / count if count else None,
           "val_loss": val, "val_bits": val / math.log(2), "val_ppl": math.exp(min(val, 700.0)),
           "val_accuracy": accuracy, "lr": lr_at(progress.step, run.configs["training"]),
           "tokens_per_s": progress.window_tokens / progress.window_seconds if count else None,
           "elapsed_s": progress.elapsed()}
    progress.history.append(row)
    progress.train_loss_sum, progress.train_loss_count = 0.0, 0
    progress.window_tokens, progress.window_seconds = 0, 0.0
    if rt.rank == 0:
        out_dir = Path(run.configs["training"].out_dir)
        write_log(out_dir, progress.history, unit)
        plot_losses(out_dir, progress.history)
        task = run.configs["data"].task != "none"
        bar.write(f"step {progress.step}: val loss {val:.4f} nats, {row['val_bits']:.4f} bits per {unit}, "
                  f"perplexity {row['val_ppl']:.2f}, accuracy {100 * accuracy:.2f}%" + " (answer tokens)" * task)


def _save(path: Path, raw, optimizer, data_rng, progress: Progress, run: Run, rt: Runtime) -> None:
    """Write the checkpoint (rank 0), after checking that every process holds the same weights."""
    sd = raw.state_dict()
    if len(set(gather(model_fingerprint(sd), rt))) > 1:
        die(f"step {progress.step}: the processes hold different weights (replicas out of sync)", 1)
    data_rngs = gather(data_rng.get_state(), rt)  # one stream per process: resume needs them all
    if rt.rank == 0:
        save_checkpoint({
            "format": CKPT_FORMAT, "step": progress.step, "model": sd, "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
            "data_rng": data_rngs, "config": {k: asdict(v) for k, v in run.configs.items()},
            "tokenizer": run.tokenizer.state_dict(), "metrics": progress.saved()}, path)
    progress.saved_step = progress.step
    if rt.world > 1:
        dist.barrier()  # nobody exits (and has torchrun stop the others) before rank 0 has written


def _restore(path: Path, run: Run, optimizer, data_rng, rt: Runtime) -> Progress:
    """Load the checkpoint this run's configuration wrote into the fresh objects; the progress it had."""
    if not path.is_file():
        die(f"--resume: {path} does not exist; train without --resume first")
    ckpt = read_checkpoint(path)
    for key, value in asdict(run.configs["model"]).items():
        if ckpt["config"]["model"].get(key) != value:
            die(f"--resume: {path} holds a model with [model] {key} = {ckpt['config']['model'].get(key)}, "
                f"the config says {value}")
    if ckpt["tokenizer"] != run.tokenizer.state_dict():
        die(f"--resume: {path} was trained with another tokenizer than [data] gives now")
    if len(ckpt["data_rng"]) != rt.world:
        die(f"--resume: {path} was written by {len(ckpt['data_rng'])} processes; resume with as many "
            f"(this run has {rt.world}) to continue their data streams")
    run.model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    data_rng.set_state(ckpt["data_rng"][rt.rank])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if rt.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], rt.device)
    return Progress(step=ckpt["step"], saved_step=ckpt["step"], **ckpt["metrics"])
