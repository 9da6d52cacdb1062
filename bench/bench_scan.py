"""Benchmark the selective scan: selective_scan_fn vs the sequential loop vs mambapy's pscan.

    python bench/bench_scan.py                                  # the grid of the core issue
    python bench/bench_scan.py --sizes 1x1536 --lengths 256,1024,4096,16384 --modes fwd,fwdbwd \
        --png assets/scan_scaling.png
    python bench/bench_scan.py --device cuda
    python bench/bench_scan.py --methods fast,fast@1,fast@4 --sizes 8x512 --lengths 256,4096

Every (method, shape) runs in a fresh subprocess, so its peak memory is its own: on CPU the
growth of the resident set (VmHWM, reset before the run) over what the inputs already took; on
CUDA torch.cuda.max_memory_allocated minus the inputs. Times are medians over --repeats runs
after one warm-up run, which is the
one whose peak memory is reported. The methods compute the same thing, float32, n = 16:
    fast   selective_scan_fn (this repo's two-level chunked scan, custom backward)
    loop   selective_scan_ref (the sequential loop, autograd through it)
    pscan  mambapy's Blelloch scan, after discretising as mambapy does: exp(Δ A) and Δ B u
           materialised as (b, l, d, n) tensors (mambapy is a benchmark-only dependency)
    fast@K selective_scan_fn with the length cut into K chunks of ceil(l / K) steps instead of by
           _chunk_len's rule (fewer when the last would be empty), to check the rule on a machine:
           `--methods fast,fast@1,fast@4` times the rule beside one and four chunks
Configurations whose estimated memory exceeds --max-gb are skipped and marked so.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import selective_scan  # noqa: E402
from selective_scan import selective_scan_fn, selective_scan_ref  # noqa: E402

METHODS = ("fast", "loop", "pscan")
# full-size (b, d, n, l) float32 tensors each method holds at its peak (measured at 4x768x1024:
# 2.6, 4.9 and 8.0), rounded up: used only to skip what would not fit in --max-gb
COPIES = {"fast": 3, "loop": 6, "pscan": 9}


def make_inputs(b, d, l, n, device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, l, generator=g)
    delta = torch.rand(b, d, l, generator=g) * 0.1
    A = -torch.rand(d, n, generator=g) - 0.5
    B = torch.randn(b, n, l, generator=g)
    C = torch.randn(b, n, l, generator=g)
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C)]


def run_pscan(u, delta, A, B, C):
    from mambapy.pscan import pscan
    x, dt = u.transpose(1, 2), delta.transpose(1, 2)                      # (b, l, d)
    dA = torch.exp(dt.unsqueeze(-1) * A)                                  # (b, l, d, n)
    BX = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(dA, BX)
    return (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3).transpose(1, 2)


RUN = {"fast": selective_scan_fn, "loop": selective_scan_ref, "pscan": run_pscan}


def force_chunks(chunks):
    """From now on, in this process, selective_scan_fn cuts the length into `chunks` chunks of ceil(l / chunks)
    steps instead of choosing by _chunk_len's rule (for the fast@K and ours@K entries of the benchmarks)."""
    selective_scan._chunk_len = lambda l, slab, on_gpu: -(-l // chunks)


def forced_chunks(entry):
    """K of a benchmark entry fast@K or ours@K (its scan in K chunks), None for an entry without @."""
    return int(entry.split("@")[1]) if "@" in entry else None


def scan_chunks(l, slab, on_gpu):
    """How many chunks selective_scan_fn cuts a length l into, slab = b n d elements a step (forced or by the rule)."""
    return -(-l // selective_scan._chunk_len(l, slab, on_gpu))


def method_fn(method):
    """The function a --methods entry times (fast@K: selective_scan_fn in K chunks, in this subprocess only)."""
    if forced_chunks(method):
        force_chunks(forced_chunks(method))
        return selective_scan_fn
    return RUN[method]


def rss_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def first_run_peak(run, device):
    """Calls run() once; returns the bytes its peak took beyond what was in use before: on CUDA
    torch.cuda.max_memory_allocated, on CPU the resident set's high-water mark (VmHWM, reset first)."""
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    run()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")
    return max(peak - base, 0)


def measure_one(method, b, d, l, n, mode, repeats, device):
    """Runs in the subprocess: median seconds and peak extra bytes of one configuration."""
    inputs = make_inputs(b, d, l, n, device)
    fn = method_fn(method)

    def once():
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs)
        else:
            fn(*inputs).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    peak = first_run_peak(once, device)                                  # the first run's peak
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "mb": peak / 2**20}


def run_grid(args):
    rows = []
    for size in args.sizes.split(","):
        b, d = map(int, size.split("x"))
        for l in map(int, args.lengths.split(",")):
            for mode in args.modes.split(","):
                row = {"b": b, "d": d, "l": l, "mode": mode}
                for method in args.methods.split(","):
                    est_gb = COPIES[method.split("@")[0]] * b * d * args.n * l * 4 / 2**30
                    if est_gb > args.max_gb:
                        row[method] = None
                        continue
                    cmd = [sys.executable, __file__, "--one", method, str(b), str(d), str(l), mode,
                           "--n", str(args.n), "--repeats", str(args.repeats), "--device", args.device]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.exit(f"error: {method} {b}x{d}x{l} failed:\n{out.stderr}")
                    row[method] = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(format_row(row, args.methods.split(",")), flush=True)
    return rows


def format_row(row, methods):
    cells = [f"{row['b']}x{row['d']}", str(row["l"]), row["mode"]]
    for m in methods:
        r = row[m]
        cells.append("skipped (memory)" if r is None else f"{r['s'] * 1e3:.1f} ms / {r['mb']:.0f} MB")
    fast, others = row.get("fast"), [row[m] for m in methods if m != "fast" and row[m]]
    best = min((r["s"] for r in others), default=None)
    cells.append(f"{best / fast['s']:.2f}x" if fast and best else "-")
    return "| " + " | ".join(cells) + " |"


def plot(rows, path, methods):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for (b, d, mode) in sorted({(r["b"], r["d"], r["mode"]) for r in rows}):
        sel = [r for r in rows if (r["b"], r["d"], r["mode"]) == (b, d, mode)]
        for m in methods:
            pts = [(r["l"], r[m]["s"]) for r in sel if r[m]]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=f"{m} {mode} {b}x{d}")
    ax.set_xlabel("sequence length l")
    ax.set_ylabel("seconds (median)")
    ax.set_title("selective scan, float32, n = 16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1x128,1x1536,4x768,8x1536", help="comma-separated b x d")
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--modes", default="fwdbwd", help="fwd, fwdbwd or both")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-gb", type=float, default=14.0, help="skip configurations estimated above this")
    p.add_argument("--png", help="write a log-log plot of time against length here")
    p.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        method, b, d, l, mode = args.one
        print(json.dumps(measure_one(method, int(b), int(d), int(l), args.n, mode, args.repeats, args.device)))
        return
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS and not re.fullmatch(r"fast@[1-9][0-9]*", m)]
    if bad:
        sys.exit(f"error: unknown --methods {','.join(bad)}: use {', '.join(METHODS)} or fast@K (K chunks, K >= 1)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"selective scan, float32, n={args.n}, {name}, torch {torch.__version__}, median of {args.repeats}\n")
    columns = " | ".join(f"{m} time / peak" for m in methods)
    print(f"| b x d | l | mode | {columns} | fast speed-up vs best other |")
    print("|" + "---|" * (len(methods) + 4))
    rows = run_grid(args)
    if args.png:
        plot(rows, args.png, methods)


if __name__ == "__main__":
    main()
