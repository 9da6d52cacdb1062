"""Benchmark reading a long prompt: MambaLM.prefill in chunks (the state carried from chunk to chunk) against
one pass over the whole prompt, time and peak memory by prompt length.

    python bench/bench_prefill.py                                   # 2^12 .. 2^20 tokens, the default model
    python bench/bench_prefill.py --lengths 4096,65536 --one-pass-max 65536 --chunk 2048

Every (method, length) runs in a fresh subprocess, so its peak memory is its own: the growth of the resident
set (VmHWM, reset before the run) over what the model and the prompt already took. The model has random
weights of the default size (d_model 256, 4 layers, vocabulary 256); the time does not depend on the values.
Chunked prefill holds one chunk's activations whatever the length; one pass holds the whole prompt's, so it is
only run up to --one-pass-max tokens.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_scan import first_run_peak  # noqa: E402

from mamba_config import MambaConfig  # noqa: E402
from model import MambaLM  # noqa: E402


def measure_one(length, chunk, args):
    """(median seconds, peak bytes) of prefilling one random prompt of ``length`` tokens, chunk tokens at a time."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)).eval()
    ids = torch.randint(args.vocab, (1, length), generator=torch.Generator().manual_seed(1))

    def run():
        model.prefill(ids, model.allocate_cache(1), chunk_size=chunk)
    peak = first_run_peak(run, "cpu")  # also the warm-up
    times = []
    for _ in range(args.repeats if length <= 2**16 else 1):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=",".join(str(2**k) for k in range(12, 21)))
    p.add_argument("--chunk", type=int, default=2048, help="tokens per prefill chunk (default: model.py's)")
    p.add_argument("--one-pass-max", type=int, default=2**16, help="longest prompt read in one pass")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs up to 2^16 tokens (one beyond)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # (length, chunk): run in this process
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        with torch.inference_mode():
            print(json.dumps(measure_one(*args.one, args)))
        return
    passthrough = ["--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--vocab", str(args.vocab),
                   "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
    print(f"prefill of one prompt, d_model {args.d_model}, {args.n_layer} layers, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats} up to 2^16\n")
    print(f"| tokens | chunked ({args.chunk} at a time): seconds / tokens/s / peak "
          "| one pass: seconds / tokens/s / peak |")
    print("|---|---|---|")
    for length in (int(v) for v in args.lengths.split(",")):
        cells = []
        for chunk in (args.chunk, length):
            if chunk == length and length > args.one_pass_max:
                cells.append("not run")
                continue
            out = subprocess.run([sys.executable, __file__, *passthrough, "--one", str(length), str(chunk)],
                                 capture_output=True, text=True, check=True)
            seconds, peak = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{seconds:.3f} s / {length / seconds:,.0f} / {peak / 2**20:.0f} MB")
        print(f"| {length:,} | {cells[0]} | {cells[1]} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
