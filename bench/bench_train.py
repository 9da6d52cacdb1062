"""Benchmark training: tokens/s and model FLOPs utilisation (MFU) of Mamba-1 (ours), Mamba-2, mambapy and the
Transformer baseline, all of the same size.

    python bench/bench_train.py                                     # d_model 256, 4 layers, batch 8 x 256, CPU
    python bench/bench_train.py --models ours,mamba2,transformer    # the three models this repository trains
    python bench/bench_train.py --device cuda                       # bf16 autocast, the scan in float32
    python bench/bench_train.py --steps 3 --warmup 1                # a smoke check
    python bench/bench_train.py --models ours,ours@1,transformer    # ours beside its scan in one chunk

One training step = forward, cross-entropy over every position, backward, AdamW step (lr 3e-4, weight decay 0.1
on every parameter, PyTorch's default foreach implementation for every model), on one fixed batch of random
token ids. The step time is the median over --steps steps after --warmup untimed ones (synchronised on CUDA),
pooled over --rounds fresh processes per model taken in turn with the other models' (ours, the Transformer, ours,
...), so that a machine whose speed drifts from minute to minute drifts under all of them alike;
tokens/s = batch * seq / step time. Every model trains in a fresh subprocess, so its peak memory is its own: on
CPU the growth of the resident set (VmHWM, reset before the first step) during the first step, on CUDA
torch.cuda.max_memory_allocated above what model, optimizer and batch held before it. The models, seeded alike:
    ours         MambaLM (model.py), its fast scan and custom backward.
    mamba2       MambaLM with [model] layer = mamba2 (mamba2.py, ssd.py's chunked SSD), --mamba2-d-state state.
    mambapy      mambapy's Mamba (pscan=True: its parallel Blelloch scan) between an embedding and a tied lm_head,
                 our size (bench_generate.MambapyLM).
    transformer  the Transformer baseline (transformer.py) in bench_generate.transformer_config's shape, the depth
                 bringing its parameter count closest to ours (--tf-layers overrides); the counts are printed.
    ours@K       ours with its scan's length cut into K chunks instead of by the rule of selective_scan._chunk_len
                 (`--models ours,ours@1,transformer` checks the rule on a CPU: bench_scan.py's fast@K, in training).

Model FLOPs per token of a training step (the PaLM paper's "model FLOPs": a multiply-add is 2 FLOPs, backward
costs twice the forward, recomputation is not counted, norms and activations are left out):
    Mamba:        6 * P_mm + n_layer * 3 * (2 E k + 9 E N)
        P_mm = n_layer * (d 2E + E (R + 2N) + R E + E d) + V d   weights of in_proj, x_proj, dt_proj, out_proj
                                                                 and the (tied) lm_head; the embedding is a lookup
        2 E k     the depthwise convolution (E = d_inner channels, k = d_conv taps), forward
        9 E N     the selective scan, forward, per token: exp(Δ A), Δ B u, the state update h = Ā h + B̄ u and the
                  readout C h over the E x N state; 9 per state element is the count the official kernels'
                  authors give (state-spaces/mamba issue 110)
    Mamba-2:      6 * P_mm + n_layer * 3 * (2 K k + 2 T (G N + E) + 4 E N)
        P_mm = n_layer * (d (E + K + H) + E d) + V d             in_proj (z, x B C, dt), out_proj, lm_head; K = E + 2GN
        2 T (G N + E)  the chunk's masked products, C_t . B_s per group and the weights times Δx per channel, over
                       the full T x T square (T = the chunk size), as attention is counted below
        4 E N     each chunk's final state and the readout of the state entering it
    Transformer:  6 * P_mm + 12 * n_layer * d * seq   with P_mm = n_layer * (4 d^2 + 3 d F) + V d (qkv, out_proj,
                  the SwiGLU MLP of width F, lm_head); 12 n_layer d seq is attention's q k^T and weights @ v at
                  every position, forward and backward, counted over the full seq x seq square as PaLM and nanoGPT
                  do (causal attention needs half).
MFU = FLOPs per token * tokens/s / the matmul rate measured in the same run: the median of --mm-repeats timed
torch.mm of two --mm-size square matrices (2 n^3 FLOPs; n = 2048 on CPU, 8192 on CUDA), float32 on CPU,
bfloat16 under bf16 autocast.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_generate import MambapyLM, sync, transformer_config  # noqa: E402  (the baselines are defined there)
from bench_scan import first_run_peak, force_chunks, forced_chunks, scan_chunks  # noqa: E402

from mamba_config import MambaConfig  # noqa: E402
from pretrained import build_model  # noqa: E402

MODELS = ("ours", "mamba2", "mambapy", "transformer")


def mamba_flops_per_token(c: MambaConfig):
    """Model FLOPs of one training token for a Mamba of config c (accounting in the module docstring)."""
    E, N, R, d = c.d_inner, c.d_state, c.dt_rank_value, c.d_model
    matmul_params = c.n_layer * (d * 2 * E + E * (R + 2 * N) + R * E + E * d) + c.padded_vocab_size * d
    return 6 * matmul_params + c.n_layer * 3 * (2 * E * c.d_conv + 9 * E * N)


def mamba2_flops_per_token(c: MambaConfig, seq):
    """The same for a Mamba-2 block (accounting in the module docstring)."""
    E, N, d, G, T = c.d_inner, c.d_state, c.d_model, c.ngroups, min(c.chunk_size, seq)
    H, conv = E // c.headdim, E + 2 * G * N
    matmul_params = c.n_layer * (d * (E + conv + H) + E * d) + c.padded_vocab_size * d
    ssd = 2 * T * (G * N + E) + 2 * 2 * E * N
    return 6 * matmul_params + c.n_layer * 3 * (2 * conv * c.d_conv + ssd)


def transformer_flops_per_token(c: MambaConfig, seq):
    matmul_params = c.n_layer * (4 * c.d_model ** 2 + 3 * c.d_model * c.expand * c.d_model) \
        + c.padded_vocab_size * c.d_model
    return 6 * matmul_params + 12 * c.n_layer * c.d_model * seq


def configs(args):
    """The [model] of each model this benchmark builds (mambapy's is ours, assembled from its own block)."""
    ours = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    return {"ours": ours, "mambapy": ours, "mamba2": replace(ours, layer="mamba2", d_state=args.mamba2_d_state),
            "transformer": transformer_config(args.d_model, args.n_layer, args.vocab, args.tf_layers)}


def build(name, args):
    """(model, FLOPs per training token) on args.device, in train mode."""
    torch.manual_seed(0)
    kind = name.split("@")[0]                       # ours@K is ours
    c = configs(args)[kind]
    if name == "mambapy":
        model, flops = MambapyLM(args.d_model, args.n_layer, args.vocab), mamba_flops_per_token(c)
    else:
        model = build_model(c)
        flops = {"ours": lambda: mamba_flops_per_token(c), "mamba2": lambda: mamba2_flops_per_token(c, args.seq),
                 "transformer": lambda: transformer_flops_per_token(c, args.seq)}[kind]()
    return model.to(args.device).train(), flops


def measure_one(name, args):
    """Runs in the subprocess: median step seconds, peak extra MiB, parameters and FLOPs/token of one model."""
    if forced_chunks(name):
        force_chunks(forced_chunks(name))
    model, flops = build(name, args)
    chunks = None   # how many chunks ours's fast scan cuts a sequence into at this size (selective_scan.py)
    if name.split("@")[0] == "ours":
        c = model.config
        chunks = scan_chunks(args.seq, args.batch * c.d_state * c.d_inner, args.device != "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)

    peak = first_run_peak(step, args.device)
    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "mb": peak / 2**20, "flops_per_token": flops,
            "params": sum(p.numel() for p in model.parameters()),
            "layers": model.config.n_layer if name == "transformer" else args.n_layer, "scan_chunks": chunks}


def matmul_rate(args):
    """FLOP/s of a square torch.mm, median of --mm-repeats after a warm-up: the ceiling MFU is measured against."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    a, b = (torch.randn(args.mm_size, args.mm_size, device=args.device).to(dtype) for _ in range(2))
    times = []
    for _ in range(args.mm_repeats + 1):
        sync(args.device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return 2 * args.mm_size ** 3 / statistics.median(times[1:])


def run_one(name, args):
    """measure_one in a fresh interpreter with the same settings."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name]
    for key in ("d_model", "n_layer", "vocab", "batch", "seq", "steps", "warmup", "device", "precision",
                "threads", "tf_layers", "mamba2_d_state"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1: it measures memory)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per model, taken in turn with the other "
                   "models' (their steps pooled), so that all are timed over the same minutes (default 3)")
    p.add_argument("--tf-layers", type=int, help="Transformer depth (default: the closest parameter count)")
    p.add_argument("--mamba2-d-state", type=int, default=128, help="Mamba-2's state size per channel (default: "
                   "128, the official block's and configs/mamba2.ini's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto", "float32", "bf16"), default="auto",
                   help="bf16: bfloat16 autocast over float32 weights; auto: bf16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--mm-size", type=int, help="side of the matrices timing the matmul rate (default: 2048 on "
                   "CPU, 8192 on CUDA, where a smaller product is too short to time)")
    p.add_argument("--mm-repeats", type=int, default=5)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and args.device == "cuda")
    args.warmup = max(args.warmup, 1)
    args.mm_size = args.mm_size or (8192 if args.device == "cuda" else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return

    names = args.models.split(",")
    bad = [m for m in names if m not in MODELS and not re.fullmatch(r"ours@[1-9][0-9]*", m)]
    if bad:
        sys.exit(f"error: unknown --models {','.join(bad)}: use {', '.join(MODELS)} or ours@K (its scan in K chunks)")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if args.bf16 else "float32"
    rate = matmul_rate(args)
    print(f"training, d_model {args.d_model}, {args.n_layer} layers, vocabulary {args.vocab}, batch {args.batch} x "
          f"{args.seq}, AdamW, {precision}, {device}, torch {torch.__version__}, median of {args.steps} steps x "
          f"{args.rounds} rounds")
    print(f"matmul rate ({precision.split()[0]} torch.mm {args.mm_size}^3): {rate / 1e9:.1f} GFLOP/s\n")
    print("| model | parameters | step (ms) | tokens/s | MFLOP/token | GFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    rounds = [{name: run_one(name, args) for name in names} for _ in range(max(1, args.rounds))]
    results = {}
    for name in names:  # the first round's memory (each a fresh process: the same), every round's steps
        r = results[name] = rounds[0][name] | {"times": [t for rnd in rounds for t in rnd[name]["times"]]}
        r["s"] = statistics.median(r["times"])
        r["tokens_per_s"] = args.batch * args.seq / r["s"]
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / rate
        label = f"transformer ({r['layers']} layer{'s' * (r['layers'] > 1)})" if name == "transformer" else name
        print(f"| {label} | {r['params']:,} | {r['s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['flops_per_token'] / 1e6:.1f} | {r['flops_per_token'] * r['tokens_per_s'] / 1e9:.2f} | "
              f"{r['mfu']:.1%} | {r['mb']:.0f} MB |", flush=True)

    chunks = [f"{name} {results[name]['scan_chunks']}" for name in names if results[name]["scan_chunks"]]
    if chunks:
        print(f"\nchunks of the fast scan per sequence: {', '.join(chunks)}")
    pairs = [("ours", "mambapy"), ("ours", "transformer"), ("mamba2", "transformer"), ("mamba2", "ours")]
    pairs += [(name, other) for name in names if name.startswith("ours@") for other in ("ours", "transformer")]
    ratios = {f"{mine} / {other} tokens/s": results[mine]["tokens_per_s"] / results[other]["tokens_per_s"]
              for mine, other in pairs if {mine, other} <= results.keys()}
    print("\nratios (x = times):")
    for name, value in ratios.items():
        target = {"ours / mambapy tokens/s": " (target >= 4)",
                  "ours / transformer tokens/s": " (target >= 0.5, goal 0.7: issue 16)"}.get(name, "")
        print(f"- {name}: {value:.2f}x{target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_flops": rate, "models": results, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
