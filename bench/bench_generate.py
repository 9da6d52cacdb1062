"""Benchmark generation: time per new token as the context grows, and prompt processing (prefill) time.

    python bench/bench_generate.py                                  # the issue's grid: contexts 16 to 8192
    python bench/bench_generate.py --png assets/generate.png
    python bench/bench_generate.py --contexts 16,64 --steps 5       # a smoke check in seconds
    python bench/bench_generate.py --device cuda                    # bf16 autocast on a GPU

Per-token decoding. For every context length c a random prompt of c tokens is processed, then tokens are
generated greedily (argmax, fed back), each step timed on its own (synchronised on CUDA); the table gives the
median over --steps steps after --warmup untimed ones, in ms per token. The methods take turns of 16 steps,
so that all of them are timed over the same minutes of a machine whose speed drifts. Methods,
all the same size (d_model 256, 4 layers, vocabulary 256 by default), batch 1, random weights, under
torch.inference_mode:
    ours         MambaLM.prefill fills the recurrent cache (fast scan), then MambaLM.step per token:
                 constant work per token (a (b, d_inner, d_state) state and a d_conv window per layer).
    compiled     the same model and weights after MambaLM.compile_step(): each step through one torch.compile
                 graph, compiled before the table (its time is printed) for the batch size timed.
    full         no cache: the whole forward over the growing context, every step (--full-steps only: slow).
    transformer  the Transformer baseline (transformer.py: RoPE, SwiGLU, RMSNorm, attention through
                 F.scaled_dot_product_attention, tied embedding) at our parameter count (transformer_config:
                 configs/transformer.ini's shape, 2 blocks for our 4); its KV cache, one position written per
                 step, so attention reads the c cached keys and values: work per token grows with c.
    hf           transformers' MambaForCausalLM: the prompt through its forward(use_cache=True), then its
                 forward on one token with the returned cache, which is exactly the call its generate() makes
                 per token. We time these forward calls rather than generate(), so that neither side pays for
                 logits processors and stopping criteria, and the prefill (a loop over the prompt in its
                 PyTorch fallback) stays out of the per-token time. On CPU it runs its pure-PyTorch fallbacks
                 (mamba_ssm and causal_conv1d are CUDA kernels); on a GPU where they are installed it uses them.

Prefill of one --prefill-len prompt (default 1024), median of --repeats after a warm-up on 16 tokens:
    ours         MambaLM.prefill: the parallel scan over the prompt, leaving the cache ready to step.
    hf           forward(use_cache=True): its fallback scan loops over the prompt's positions.
    mambapy      its Mamba.step token by token, as its LM.generate() does: its parallel forward (pscan) returns
                 no state to continue from. Assembled here as MambapyLM, lm_head tied to the embedding: our size.
    transformer  TransformerLM.prefill: causal forwards of 2048 tokens at a time into the KV cache.

Ratios printed after the table: ours at the largest context over ours at the smallest (flat is constant-time
decoding), Transformer over ours and hf over ours (how many times faster ours is per token) at the largest
context, then hf over ours in median and at its lowest over the contexts; with compiled, ours over compiled in
median (what compiling the step gains) and hf over compiled at its lowest.
transformer_config and MambapyLM below are bench_train.py's baselines too.
"""
import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba_config import MambaConfig, param_count  # noqa: E402
from model import MambaLM  # noqa: E402
from transformer import TransformerLM  # noqa: E402

DECODERS = ("ours", "full", "transformer", "hf", "compiled")
PREFILLERS = ("ours", "hf", "mambapy", "transformer")
TITLES = {"ours": "ours: recurrent step", "full": "ours: full forward each token",
          "transformer": "Transformer + KV cache", "hf": "transformers MambaForCausalLM",
          "compiled": "ours: recurrent step, compiled"}
PREFILL_TITLES = {"ours": "ours: MambaLM.prefill (fast scan)", "hf": "transformers: forward(use_cache=True)",
                  "mambapy": "mambapy: LM step per token",
                  "transformer": "Transformer: causal forward into the KV cache"}


# ----------------------------------------------------------------------------- the Transformer baseline

def transformer_config(d_model, n_layer, vocab, layers=None) -> MambaConfig:
    """The Transformer baseline (transformer.py) at the size of a Mamba of d_model and n_layer blocks: the shape
    of configs/transformer.ini (MLP 3 d_model wide, heads of 64 channels) with the depth whose parameter count
    is closest to the Mamba's (counted on the meta device), or ``layers`` blocks."""
    def config(depth):
        return MambaConfig(layer="transformer", d_model=d_model, n_layer=depth, expand=3,
                           n_head=max(1, d_model // 64), vocab_size=vocab)
    if layers:
        return config(layers)
    target = param_count(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab))
    with torch.device("meta"):
        sizes = {depth: TransformerLM(config(depth)).num_params() for depth in range(1, 2 * n_layer + 1)}
    return config(min(sizes, key=lambda depth: abs(sizes[depth] - target)))


# ----------------------------------------------------------------------------- the models under test

def build_models(args, names):
    """The models a run needs, on args.device, in eval mode, all seeded alike."""
    models = {}
    torch.manual_seed(0)
    if {"ours", "full", "compiled"} & names:
        models["ours"] = MambaLM(MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab))
    if "compiled" in names:
        models["compiled"] = copy.deepcopy(models["ours"]).compile_step()
    if "transformer" in names:
        models["transformer"] = TransformerLM(transformer_config(args.d_model, args.n_layer, args.vocab))
    if "hf" in names:
        import transformers
        transformers.logging.set_verbosity_error()            # it warns that it runs its PyTorch fallbacks
        config = transformers.MambaConfig(vocab_size=args.vocab, hidden_size=args.d_model, state_size=16,
                                          num_hidden_layers=args.n_layer, expand=2, conv_kernel=4,
                                          layer_norm_epsilon=1e-5, use_mambapy=False)
        models["hf"] = transformers.MambaForCausalLM(config)
    if "mambapy" in names:
        models["mambapy"] = MambapyLM(args.d_model, args.n_layer, args.vocab)
    return {name: m.to(args.device).eval() for name, m in models.items()}


class MambapyLM(nn.Module):
    """mambapy's Mamba (pscan=True) between an embedding and an lm_head tied to it, our size. Its own LM wrapper
    (mambapy.lm) imports its Mamba-2, which needs mamba_ssm, so the same three pieces are assembled here."""

    def __init__(self, d_model, n_layer, vocab_size):
        super().__init__()
        from mambapy.mamba import Mamba, RMSNorm  # a benchmark-only dependency
        from mambapy.mamba import MambaConfig as MambapyConfig
        self.config = MambapyConfig(d_model=d_model, n_layers=n_layer, pscan=True)
        padded = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size).padded_vocab_size
        self.embedding = nn.Embedding(padded, d_model)
        self.mamba = Mamba(self.config)
        self.norm_f = RMSNorm(d_model, self.config.rms_norm_eps)
        self.lm_head = nn.Linear(d_model, padded, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, ids):
        """ids (b, l) -> logits (b, l, vocab): its parallel scan (pscan), no state kept."""
        return self.lm_head(self.norm_f(self.mamba(self.embedding(ids))))

    def step(self, token, caches):
        """token (b,) -> (logits (b, vocab), caches): its recurrent step, caches = (h, last inputs) per layer."""
        x, caches = self.mamba.step(self.embedding(token), caches)
        return self.lm_head(self.norm_f(x)), caches


def hf_forward(model, ids, cache, position):
    """transformers' Mamba forward with its cache, as its generate() calls it -> (last logits (b, v), cache).
    transformers 5 names the argument `cache`; 4.x called it `cache_params` and wanted the cache_position."""
    if "cache" not in inspect.signature(model.forward).parameters:
        out = model(input_ids=ids, cache_params=cache, use_cache=True,
                    cache_position=torch.arange(position, position + ids.shape[1], device=ids.device))
        return out.logits[:, -1], out.cache_params
    out = model(input_ids=ids, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache


def decoder(name, models, args):
    """(start, step) for a method: start(prompt (b, c)) -> (logits (b, v), state);
    step(token (b,), state, position) -> (logits (b, v), state), position being the token's index."""
    if name in ("ours", "compiled"):
        model = models[name]

        def start(ids):
            cache = model.allocate_cache(ids.shape[0], device=ids.device)
            return model.prefill(ids, cache), cache
        return start, lambda token, cache, pos: (model.step(token, cache), cache)
    if name == "full":
        model = models["ours"]

        def step(token, ids, pos):
            ids = torch.cat([ids, token[:, None]], dim=1)
            return model(ids)[:, -1], ids
        return lambda ids: (model(ids)[:, -1], ids), step
    if name == "transformer":
        model = models["transformer"]

        def start(ids):
            kv = model.allocate_cache(ids.shape[0], device=ids.device, dtype=kv_dtype(args))
            return model.prefill(ids, kv), kv
        return start, lambda token, kv, pos: (model.step(token, kv), kv)
    model = models["hf"]
    return (lambda ids: hf_forward(model, ids, None, 0),
            lambda token, cache, pos: hf_forward(model, token[:, None], cache, pos))


def kv_dtype(args):
    """The dtype keys and values come out of the qkv projection in, so the cache stores them without casts."""
    return torch.bfloat16 if args.bf16 else torch.float32


def prefill_fn(name, models, args):
    """prompt (b, l) -> logits of its last position, leaving whatever state decoding would continue from."""
    model = models[name]
    if name == "ours":
        return lambda ids: model.prefill(ids, model.allocate_cache(ids.shape[0], device=ids.device))
    if name == "hf":
        return lambda ids: hf_forward(model, ids, None, 0)[0]
    if name == "transformer":
        return lambda ids: model.prefill(ids, model.allocate_cache(ids.shape[0], ids.device, kv_dtype(args)))

    def mambapy_prefill(ids):                                    # its generate(): one step per prompt token
        c = model.config
        caches = [(None, torch.zeros(ids.shape[0], c.d_inner, c.d_conv - 1, device=ids.device))
                  for _ in range(c.n_layers)]
        for t in range(ids.shape[1]):
            logits, caches = model.step(ids[:, t], caches)
        return logits
    return mambapy_prefill


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def prompt(args, length):
    g = torch.Generator().manual_seed(length)
    return torch.randint(0, args.vocab, (args.batch, length), generator=g).to(args.device)


ROUND = 16  # decoding steps a method takes before the next one's turn


def per_token_ms(names, models, args, context):
    """name -> median ms of one greedy decoding step after a prompt of `context` tokens. The methods take turns
    of ROUND steps each (the first step of a turn finds the caches holding the other model's weights: a median
    over ROUND steps discounts it), so that every method's median is taken over the same minutes of this
    machine, whose speed drifts by more than the differences measured; "full" takes its --full-steps apart."""
    def run(group, steps, warmup):
        decoders = {name: decoder(name, models, args) for name in group}
        state = {}
        for name, (start, _) in decoders.items():
            logits, state[name] = start(prompt(args, context))
            state[name] = (logits.argmax(-1), state[name])
        times = {name: [] for name in group}
        for turn in range(0, warmup + steps, ROUND):
            for name, (_, step) in decoders.items():
                token, s = state[name]
                for i in range(turn, min(turn + ROUND, warmup + steps)):
                    sync(args.device)
                    t0 = time.perf_counter()
                    logits, s = step(token, s, context + i)
                    token = logits.argmax(-1)
                    sync(args.device)
                    if i >= warmup:
                        times[name].append(time.perf_counter() - t0)
                state[name] = (token, s)
        return {name: statistics.median(t) * 1e3 for name, t in times.items()}
    together = [name for name in names if name != "full"]
    out = run(together, args.steps, args.warmup) if together else {}
    if "full" in names:
        out |= run(["full"], args.full_steps, 1)
    return out


def first_step_s(model, args):
    """Seconds of a model's first step at batch --batch: for a compiled step, its compile."""
    t0 = time.perf_counter()
    model.step(torch.zeros(args.batch, dtype=torch.long, device=args.device),
               model.allocate_cache(args.batch, device=args.device))
    sync(args.device)
    return time.perf_counter() - t0


def prefill_s(name, models, args):
    """Median seconds to process one prompt of --prefill-len tokens, after a warm-up on 16."""
    fn = prefill_fn(name, models, args)
    fn(prompt(args, min(16, args.prefill_len)))
    times = []
    for _ in range(args.repeats):
        ids = prompt(args, args.prefill_len)
        sync(args.device)
        t0 = time.perf_counter()
        fn(ids)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- report

def ratio(a, b):
    return a / b if a and b else float("nan")


def ratios(rows, decoders):
    """name -> value: the figures the acceptance criteria name (x means "times")."""
    lo, hi = rows[0], rows[-1]
    out = {}
    if "ours" in decoders:
        out[f"ours@{hi['context']} / ours@{lo['context']} (constant time per token: target <= 1.15)"] = \
            ratio(hi["ours"], lo["ours"])
    for other, note in (("transformer", "target >= 3 on CPU"), ("full", "cost of not caching"),
                        ("hf", "target >= 2.5 at every context, see the lowest below")):
        if {"ours", other} <= set(decoders):
            out[f"{other}@{hi['context']} / ours@{hi['context']} ({note})"] = ratio(hi[other], hi["ours"])
    if {"ours", "hf"} <= set(decoders) and len(rows) > 1:
        each = [ratio(r["hf"], r["ours"]) for r in rows]
        out["hf / ours, median over contexts"] = statistics.median(each)
        out["hf / ours, lowest over contexts (the target's figure: >= 2.5)"] = min(each)
    if {"ours", "compiled"} <= set(decoders):
        out["ours / compiled, median over contexts (what compiling the step gains)"] = \
            statistics.median(ratio(r["ours"], r["compiled"]) for r in rows)
    if {"hf", "compiled"} <= set(decoders):
        out["hf / compiled, lowest over contexts"] = min(ratio(r["hf"], r["compiled"]) for r in rows)
    return out


def plot(rows, decoders, path, title):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in decoders:
        pts = [(r["context"], r[name]) for r in rows if r.get(name)]
        ax.plot(*zip(*pts), marker="o", label=TITLES[name], color=f"C{DECODERS.index(name)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")                     # the full forward is orders of magnitude above the others
    ax.set_xticks([r["context"] for r in rows], [str(r["context"]) for r in rows])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # labels on every minor tick overlap
    ax.set_xlabel("context (tokens already seen)")
    ax.set_ylabel("ms per new token (median)")
    ax.set_title(title.replace(", batch", ",\nbatch", 1), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ops_per_step(model, device):
    """How many aten operations one MambaLM.step dispatches (torch.profiler, after a warm-up step): the count
    that sets decoding speed at this size more than the arithmetic does, and that, unlike a time, this shared
    machine cannot blur."""
    from torch.profiler import profile
    cache, token = model.allocate_cache(1, device=device), torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model.step(token, cache)
        with profile() as prof:
            model.step(token, cache)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def describe(models, args, max_context):
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"generation, d_model {args.d_model}, {args.n_layer} layers, vocabulary {args.vocab}, batch "
             f"{args.batch}, {'bf16 autocast' if args.bf16 else 'float32'}, {name}, torch {torch.__version__}"]
    for key, m in models.items():
        extra = f" ({m.config.n_layer} blocks)" if key == "transformer" else ""
        lines.append(f"parameters: {key} {sum(p.numel() for p in m.parameters()):,}{extra}")
    c = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    state = args.n_layer * c.d_inner * (c.d_conv + c.d_state) * 4
    kv = 2 * transformer_config(args.d_model, args.n_layer, args.vocab).n_layer * max_context * args.d_model * 4
    lines.append(f"cache per sequence, float32: Mamba {state / 2**10:.0f} KiB at any context; "
                 f"Transformer KV {kv / 2**20:.1f} MiB at {max_context}")
    if "ours" in models:
        lines.append(f"aten operations per decoding step (ours, batch 1): {ops_per_step(models['ours'], args.device)}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="16,64,256,1024,4096,8192", help="comma-separated prompt lengths")
    p.add_argument("--methods", default=",".join(DECODERS), help="decoding methods to time")
    p.add_argument("--prefill-methods", default=",".join(PREFILLERS), help="prefill methods; empty: none")
    p.add_argument("--steps", type=int, default=32, help="timed decoding steps per context")
    p.add_argument("--warmup", type=int, default=3, help="untimed decoding steps first")
    p.add_argument("--full-steps", type=int, default=3, help="timed steps for the full forward (one warm-up)")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="prefill runs per method")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto", "float32", "bf16"), default="auto",
                   help="bf16: bfloat16 autocast over float32 weights; auto: bf16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--png", help="write ms/token against context here")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and args.device == "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = sorted(map(int, args.contexts.split(",")))
    decoders = [m for m in args.methods.split(",") if m]
    prefillers = [m for m in args.prefill_methods.split(",") if m]
    models = build_models(args, set(decoders) | set(prefillers))
    header = describe(models, args, contexts[-1])
    print("\n".join(header) + "\n")

    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    if "compiled" in models:
        with torch.inference_mode(), autocast:
            seconds = first_step_s(models["compiled"], args)
        print(f"compiled: the first step, which compiles the graph, took {seconds:.1f} s\n")
    rows = []
    print("| context | " + " | ".join(f"{TITLES[m]} (ms/token)" for m in decoders) + " |")
    print("|---" * (len(decoders) + 1) + "|")
    with torch.inference_mode(), autocast:
        for context in contexts:
            row = {"context": context} | per_token_ms(decoders, models, args, context)
            rows.append(row)
            print(f"| {context} | " + " | ".join(f"{row[m]:.2f}" for m in decoders) + " |", flush=True)
        found = ratios(rows, decoders)
        print("\nratios (x = times):")
        for name, value in found.items():
            print(f"- {name}: {value:.2f}x")

        prefill = {}
        if prefillers:
            print(f"\n| prefill of {args.prefill_len} tokens | seconds | tokens/s | / ours |\n|---|---|---|---|")
        for name in prefillers:
            prefill[name] = prefill_s(name, models, args)
            tokens_per_s = args.prefill_len * args.batch / prefill[name]
            print(f"| {PREFILL_TITLES[name]} | {prefill[name]:.3f} | {tokens_per_s:.0f} "
                  f"| {ratio(prefill[name], prefill.get('ours')):.2f}x |", flush=True)

    if args.png:
        plot(rows, decoders, args.png, header[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "per_token_ms": rows, "ratios": found, "prefill_s": prefill}, f, indent=1)


if __name__ == "__main__":
    main()
