"""Training: AdamW with the Mamba recipe, checkpoints that resume exactly, one or many processes.

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

Fine-tuning ([model] init_from = a pretrained directory or hub name, see pretrained.py): the model
takes that checkpoint's architecture and weights, and the corpus is encoded with its tokenizer.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CKPT_FORMAT, die, model_fingerprint, read_checkpoint, save_checkpoint
from data import DataConfig, get_batch, load_dataset
from tasks import IGNORE, TaskTokenizer, make_batch
from main import write_config
from model import MambaConfig, MambaLM
from pretrained import init_config, load_weights, resolve

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT (128 + 2)


def _field(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass
class TrainConfig:
    """How to train (the ``[training]`` section of config.ini)."""

    out_dir: str = _field("out", "folder for ckpt.pt, config.ini, log.csv and loss.png")
    seed: int = _field(1337, "seeds the weights, the training batches and the fixed validation batches")
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "auto: CUDA when available, else CPU")
    dtype: Literal["auto", "float32", "bfloat16"] = _field("auto", (
        "autocast dtype of the matmuls (the scan stays float32); auto: bfloat16 on CUDA, else float32"))
    compile: bool = _field(False, "torch.compile the model (slow start, faster steps on GPU)")
    batch_size: int = _field(16, "sequences per micro-batch, per process")
    seq_len: int = _field(256, "tokens per training sequence")
    grad_accum: int = _field(1, "micro-batches whose gradients add up to one optimizer step")
    max_steps: int = _field(400, "optimizer steps to train for")
    lr: float = _field(3e-3, "peak learning rate, reached at the end of warm-up")
    min_lr: float = _field(3e-4, "floor of the cosine decay, reached at max_steps")
    warmup_steps: int = _field(40, "steps of linear learning-rate warm-up")
    weight_decay: float = _field(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "clip the gradient's global norm to this (0: no clipping)")
    eval_interval: int = _field(50, "steps between evaluations")
    eval_batches: int = _field(20, "size of the fixed set of validation batches")
    log_interval: int = _field(10, "steps between progress-bar updates")
    ckpt_interval: int = _field(100, "steps between checkpoints (one is also written at the end)")

    def __post_init__(self):
        value = self.__getattribute__
        checks = [(name, "> 0", value(name) > 0) for name in (
            "batch_size", "seq_len", "grad_accum", "max_steps", "lr", "eval_interval", "eval_batches",
            "log_interval", "ckpt_interval")]
        checks += [(name, ">= 0", value(name) >= 0) for name in ("warmup_steps", "weight_decay", "grad_clip")]
        checks += [(name, "in [0, 1)", 0 <= value(name) < 1) for name in ("beta1", "beta2")]
        checks += [("min_lr", f"in [0, lr = {self.lr}]", 0 <= self.min_lr <= self.lr),
                   ("warmup_steps", f"<= max_steps = {self.max_steps}", self.warmup_steps <= self.max_steps)]
        for name, expected, ok in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {value(name)}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up lr * (step + 1) / warmup,
    then half a cosine from lr down to min_lr at max_steps, and min_lr after that."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
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
    if cfg.device == "cuda" and not torch.cuda.is_available():
        die("[training] device = cuda, but torch sees no CUDA device; use auto or cpu")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
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
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def batch_drawer(data_cfg: DataConfig, tokens, cfg: TrainConfig):
    """draw(generator) -> one micro-batch (x, y): random windows of ``tokens`` (a split of the text), or
    fresh examples of [data] task."""
    if data_cfg.task != "none":
        return lambda generator: make_batch(data_cfg.task, data_cfg.task_vocab, data_cfg.task_tokens,
                                            cfg.batch_size, cfg.seq_len, generator)
    return lambda generator: get_batch(tokens, cfg.batch_size, cfg.seq_len, generator)


def fixed_val_batches(data_cfg: DataConfig, tokens, cfg: TrainConfig) -> list:
    """The validation batches every evaluation uses: drawn once from a generator seeded with the
    seed, so successive evaluations (and resumed runs) measure the same examples. Text validation
    windows come from their own split (``tokens``); task examples from a stream apart from the
    training ones, which are seeded seed + rank (CPU generators keep 32 bits of a seed: the offset
    must be smaller than that)."""
    task = data_cfg.task != "none"
    generator = torch.Generator().manual_seed(cfg.seed + 999_983 * task)
    draw = batch_drawer(data_cfg, tokens, cfg)
    return [draw(generator) for _ in range(cfg.eval_batches)]


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


def _train_step(model, params, optimizer, draw, data_rng, cfg: TrainConfig, rt: Runtime, stop: StopFlag):
    """One optimizer step, skipped when the loss or the gradient is not finite. Returns (loss averaged
    over micro-batches and processes, gradient norm, whether any process was asked to stop)."""
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(cfg.grad_accum):
        x, y = (t.to(rt.device) for t in draw(data_rng))
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


def train(model_cfg: MambaConfig, data_cfg: DataConfig, train_cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or with ``resume`` continue) the model; return the final evaluation's metrics."""
    rt = setup_runtime(train_cfg)
    try:
        return _run(model_cfg, data_cfg, train_cfg, rt, resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(model_cfg, data_cfg, cfg: TrainConfig, rt: Runtime, resume: bool) -> dict:
    master = rt.rank == 0
    tokenizer, task = None, data_cfg.task != "none"
    if task and model_cfg.init_from:
        die(f"[data] task = {data_cfg.task} trains a model from scratch; leave [model] init_from empty")
    if model_cfg.init_from:  # fine-tuning: the pretrained architecture and tokenizer
        model_cfg, tokenizer = init_config(model_cfg)
    data = None if task else load_dataset(data_cfg, tokenizer)
    if tokenizer is None:
        tokenizer = TaskTokenizer(data_cfg.task, data_cfg.task_vocab) if task else data.tokenizer
        model_cfg = replace(model_cfg, vocab_size=tokenizer.vocab_size)  # the tokenizer decides it
    configs = {"model": asdict(model_cfg), "data": asdict(data_cfg), "training": asdict(cfg)}
    out_dir, ckpt_path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    raw = MambaLM(model_cfg).to(rt.device)
    if model_cfg.init_from and not resume:  # (a resumed run reads its weights from the checkpoint)
        load_weights(raw, resolve(model_cfg.init_from))
    optimizer = torch.optim.AdamW(raw.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=rt.device.type == "cuda")
    data_rng = torch.Generator().manual_seed(cfg.seed + rt.rank)  # each process reads other windows
    # train_loss_sum / _count: the train losses since the last evaluation (the logged mean)
    state = {"history": [], "best_val_loss": math.inf, "train_loss_sum": 0.0, "train_loss_count": 0,
             "elapsed_s": 0.0}
    step = 0
    if resume:
        step, state = _restore(ckpt_path, raw, optimizer, data_rng, configs, tokenizer, rt)
    if master:
        write_config(out_dir / "config.ini", model_cfg, data_cfg, cfg)
        examples = (f"task {data_cfg.task}, fresh examples every step" if task else
                    f"{len(data.train):,} train and {len(data.val):,} val {tokenizer.unit}s")
        print(f"{raw.num_params() / 1e6:.2f}M parameters; device {rt.device} ({str(rt.dtype)[6:]}), "
              f"{rt.world} process{'es' * (rt.world > 1)}; {examples}"
              + (f"; resuming at step {step}" if resume else ""))

    fwd = torch.compile(raw) if cfg.compile else raw
    model = torch.nn.parallel.DistributedDataParallel(fwd) if rt.world > 1 else fwd
    draw = batch_drawer(data_cfg, None if task else data.train, cfg)
    val_batches = fixed_val_batches(data_cfg, None if task else data.val, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world
    started = time.perf_counter()
    window = {"tokens": 0, "seconds": 0.0}  # throughput since the last evaluation
    saved = {"step": step if resume else None}  # the step of the last checkpoint, for the NaN message

    def evaluate_and_log():
        val, accuracy = evaluate(fwd, val_batches, rt, model_cfg.vocab_size)
        count = state["train_loss_count"]
        row = {"step": step, "train_loss": state["train_loss_sum"] / count if count else None,
               "val_loss": val, "val_bits": val / math.log(2), "val_ppl": math.exp(min(val, 700.0)),
               "val_accuracy": accuracy, "lr": lr_at(step, cfg),
               "tokens_per_s": window["tokens"] / window["seconds"] if count else None,
               "elapsed_s": state["elapsed_s"] + time.perf_counter() - started}
        state["history"].append(row)
        state.update(best_val_loss=min(state["best_val_loss"], val), train_loss_sum=0.0, train_loss_count=0)
        window.update(tokens=0, seconds=0.0)
        if master:
            write_log(out_dir, state["history"], tokenizer.unit)
            plot_losses(out_dir, state["history"])
            bar.write(f"step {step}: val loss {val:.4f} nats, {row['val_bits']:.4f} bits per "
                      f"{tokenizer.unit}, perplexity {row['val_ppl']:.2f}, accuracy {100 * accuracy:.2f}%"
                      + " (answer tokens)" * task)

    def save():
        sd = raw.state_dict()
        fingerprints = gather(model_fingerprint(sd), rt)
        if len(set(fingerprints)) > 1:
            die(f"step {step}: the processes hold different weights (replicas out of sync)", 1)
        data_rngs = gather(data_rng.get_state(), rt)
        if master:
            save_checkpoint({
                "format": CKPT_FORMAT, "step": step, "model": sd, "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
                "data_rng": data_rngs, "world_size": rt.world, "replicas": fingerprints,
                "config": configs, "tokenizer": tokenizer.state_dict(),
                "metrics": {**state, "elapsed_s": state["elapsed_s"] + time.perf_counter() - started}},
                ckpt_path)
        saved["step"] = step
        if rt.world > 1:
            dist.barrier()  # nobody exits (and has torchrun stop the others) before rank 0 has written

    with StopFlag() as stop, tqdm(total=cfg.max_steps, initial=step, disable=not master, unit="step",
                                  dynamic_ncols=True) as bar:
        if step == 0:
            evaluate_and_log()  # the starting point of the curve
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss, norm, stopping = _train_step(model, raw.parameters(), optimizer, draw, data_rng, cfg, rt, stop)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                last = (f"the last good checkpoint is {ckpt_path} (step {saved['step']})"
                        if saved["step"] is not None else "no checkpoint was written yet")
                bar.close()  # so the message starts on a line of its own
                die(f"step {step + 1}: the loss is {loss} and the gradient norm {norm}; stopped without "
                    f"saving; {last}; try a lower lr or a smaller grad_clip", 1)
            step += 1
            window["tokens"] += tokens_per_step
            window["seconds"] += time.perf_counter() - t0
            state["train_loss_sum"] += loss
            state["train_loss_count"] += 1
            bar.update(1)
            if step % cfg.log_interval == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{window['tokens'] / max(window['seconds'], 1e-9):,.0f}")
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                evaluate_and_log()
            if stopping or step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
                save()
            if stopping and step < cfg.max_steps:
                if master:
                    bar.write(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume", sys.stderr)
                raise SystemExit(INTERRUPTED)
    last = state["history"][-1]
    return {**last, "unit": tokenizer.unit, "best_val_loss": state["best_val_loss"],
            "params": raw.num_params()}


def _restore(path: Path, raw, optimizer, data_rng, configs: dict, tokenizer, rt: Runtime):
    """Load a checkpoint written by this run's configuration into the fresh objects; (step, state)."""
    if not path.is_file():
        die(f"--resume: {path} does not exist; train without --resume first")
    ckpt = read_checkpoint(path)
    for key, value in configs["model"].items():
        if ckpt["config"]["model"].get(key) != value:
            die(f"--resume: {path} holds a model with [model] {key} = {ckpt['config']['model'].get(key)}, "
                f"the config says {value}")
    if ckpt["tokenizer"] != tokenizer.state_dict():
        die(f"--resume: {path} was trained with another tokenizer than [data] gives now")
    if len(ckpt["data_rng"]) != rt.world:
        die(f"--resume: {path} was written by {len(ckpt['data_rng'])} processes; resume with as many "
            f"(this run has {rt.world}) to continue their data streams")
    raw.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    data_rng.set_state(ckpt["data_rng"][rt.rank])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if rt.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], rt.device)
    return ckpt["step"], ckpt["metrics"]
