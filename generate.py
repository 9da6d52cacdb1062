"""Sample text from a trained checkpoint:

    python generate.py --ckpt out/ckpt.pt --prompt "def " --max-new-tokens 300 --seed 1
    python generate.py --ckpt out/ckpt.pt --prompt "def " --prompt "class " --num-samples 4   # 8 rows, one batch
    python generate.py --ckpt out/ckpt.pt --prompt-file prompts.txt --save-state story.pt    # one prompt a line
    python generate.py --ckpt out/ckpt.pt --resume-state story.pt --max-new-tokens 200      # ... and go on
    python generate.py --pretrained state-spaces/mamba-130m-hf --prompt "Mamba is" --top-k 40

--pretrained takes a directory in the original or the Hugging Face layout, or a hub name (see
pretrained.py), and its tokenizer.json (through the ``tokenizers`` package) instead of the byte tokenizer.

Every prompt (--prompt, repeatable, and the lines of --prompt-file) is sampled --num-samples times, all
rows in one batch: prompts of different lengths are left-padded with an attention mask, which keeps the
padding out of the state, so each row continues as its prompt would alone. The prompts are read by the
parallel scan (``model.prefill``), then every new token costs one recurrent step (``model.step``: the
convolution window and the SSM state h_t are the whole memory), so the time per token stays the same
however long the text grows. One row is printed as it is sampled (a character spread over several
tokens appears once it is whole), several when they are done. The same seed gives the same text.
--save-state writes that memory, the tokens so far and the sampler's generator to a file (it loads
with weights_only=True); --resume-state continues from it exactly as if the run had never stopped.

--compile decodes through torch.compile (``model.compile_step``): after a compile of some seconds, reported
before the text, each token costs a fraction of the eager step (figures in docs/performance.md).

Exit status: 0 done; 2 bad input (missing or unreadable checkpoint, pretrained directory or state file, a
state written by another model, empty prompt, a character the char tokenizer does not know, an impossible
sampling setting, --compile for the Transformer baseline); 1 --compile failed (on a CPU torch.compile needs
a C++ compiler); each reported in one line on stderr.
"""
import argparse
import sys
import time
from dataclasses import asdict

import torch

from checkpoint import read_state, save_state
from cli import die, encode, pick_device, read_text
from pretrained import load_model
from sampling import check_sampling

SEPARATOR = "\n" + "-" * 40 + "\n"  # printed between samples


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample text from a baby_mamba checkpoint or a pretrained Mamba.")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by main.py (default: out/ckpt.pt)")
    weights.add_argument("--pretrained", metavar="DIR_OR_NAME",
                         help="a published Mamba instead: a local directory or a hub name such as "
                              "state-spaces/mamba-130m-hf, with its tokenizer.json")
    parser.add_argument("--prompt", action="append", help="text to continue (repeatable; default: a newline)")
    parser.add_argument("--prompt-file", help="a UTF-8 file of prompts, one a line (blank lines skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to sample per sample (default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divide the logits by this; 0 = always the most likely token (default: 0.8)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens whose probability reaches p")
    parser.add_argument("--seed", type=int, default=1337, help="random seed: same seed, same text (default: 1337)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt, in one batch (default: 1)")
    parser.add_argument("--save-state", metavar="FILE", help="afterwards, write the state to continue from to FILE")
    parser.add_argument("--resume-state", metavar="FILE",
                        help="continue the generation that --save-state wrote to FILE (no prompts then)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: CUDA, else Apple's MPS, else the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile (MambaLM.compile_step): faster per token, after a compile "
                             "of some seconds before the first one (on a CPU it needs a C++ compiler)")
    return parser.parse_args(argv)


def check_args(args) -> None:
    """One-line errors for settings argparse cannot judge alone (the sampling ones as sampling.py judges them)."""
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:  # "top_k must be >= 1, got 0" -> "--top-k must be ..."
        name, rest = str(e).split(" ", 1)
        die(f"--{name.replace('_', '-')} {rest}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--num-samples", args.num_samples)):
        if value < 1:
            die(f"{flag} must be >= 1, got {value}")
    if args.resume_state and (args.prompt or args.prompt_file or args.num_samples != 1):
        die("--resume-state continues the rows it holds: give no --prompt, --prompt-file or --num-samples")


def compile_step(model, batch_size, device) -> None:
    """model.compile_step(), then one step of batch_size tokens on a scratch cache, so that the compile happens
    here, timed and reported, rather than inside the first sampled token; one line and status 1 if it fails."""
    if not hasattr(model, "compile_step"):
        die("--compile compiles a Mamba's recurrent step; this checkpoint is the Transformer baseline, whose "
            "cache grows with the text: run without --compile")
    started = time.perf_counter()
    try:  # called under inference_mode, as the sampling is: the tensors are of the kind the graph will see
        model.compile_step().step(torch.zeros(batch_size, dtype=torch.long, device=device),
                                  model.allocate_cache(batch_size, device=device))
    except Exception as e:  # a missing C++ compiler, an unsupported device: whatever torch.compile raised
        first = (str(e).strip().splitlines() or [""])[0]
        die(f"--compile: torch.compile could not compile the step ({type(e).__name__}: {first}); "
            "run without --compile", status=1)
    print(f"compiled the decoding step in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def encode_prompts(args, tokenizer, device):
    """(prompts as text, ids (b, l) with each prompt --num-samples times, left-padded, attention mask (b, l))."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line for line in read_text(args.prompt_file, "--prompt-file").splitlines() if line]
    prompts = prompts or ["\n"]
    encoded = [encode(tokenizer, prompt, "a prompt") for prompt in prompts]
    rows = [ids for ids in encoded for _ in range(args.num_samples)]
    width = max(len(ids) for ids in rows)
    pad = [[0] * (width - len(ids)) for ids in rows]  # any id: the mask keeps it out of the state
    ids = torch.tensor([p + r for p, r in zip(pad, rows)], device=device)
    mask = torch.tensor([[0] * len(p) + [1] * len(r) for p, r in zip(pad, rows)], device=device)
    return [p for p in prompts for _ in range(args.num_samples)], ids, mask


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device, "--device")
    model, tokenizer = load_model(args.ckpt, args.pretrained, device)
    # Every tensor of the sampling made under inference_mode, the cache and prompt included: then each step gets
    # tensors of one kind, which a compiled step needs (its guards tell inference tensors from others and
    # would compile a second graph for the other kind).
    with torch.inference_mode():
        sample(args, model, tokenizer, device)


def sample(args, model, tokenizer, device) -> None:
    """The prompts (or the saved state) read, the text streamed to stdout, the state saved if asked."""
    generator = torch.Generator(device).manual_seed(args.seed)
    if args.resume_state:  # the memory, tokens and generator a run left: it goes on where it stopped
        state = read_state(args.resume_state, asdict(model.config), device)
        cache, tokens, mask = state["cache"], state["tokens"], state["attention_mask"]
        generator.set_state(state["generator"])
        texts, inputs = [""] * tokens.shape[0], tokens[:, -1:]  # the last token is the one not read yet
    else:
        texts, tokens, mask = encode_prompts(args, tokenizer, device)
        cache, inputs = model.allocate_cache(tokens.shape[0], device=device), tokens

    if args.compile:
        compile_step(model, tokens.shape[0], device)

    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    started, new = time.perf_counter(), []
    padded = not args.resume_state and not mask.all()
    stream = model.stream(inputs, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator,
                          attention_mask=mask if padded else None, cache=cache)

    def first_row():  # the tokens of a single row, kept for the state file
        for token in stream:
            new.append(token)
            yield int(token[0])
    if len(texts) == 1:  # one row: printed as it comes
        sys.stdout.write(texts[0])
        for piece in tokenizer.decode_pieces(first_row()):
            sys.stdout.write(piece)
            sys.stdout.flush()
    else:
        new = list(stream)
        for i, text in enumerate(texts):
            sys.stdout.write((SEPARATOR if i else "") + text + tokenizer.decode([int(t[i]) for t in new]))
    sys.stdout.write("\n")
    seconds = time.perf_counter() - started
    n_tokens = len(new) * len(texts)
    print(f"sampled {n_tokens} tokens ({len(texts)} x {len(new)}) in {seconds:.2f} s: "
          f"{n_tokens / seconds:.1f} tokens/s on {device}", file=sys.stderr)
    if args.save_state:
        tokens = torch.cat([tokens, torch.stack(new, dim=1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(tokens[:, mask.shape[1]:])], dim=1)
        save_state(args.save_state, asdict(model.config), cache, tokens, mask, generator.get_state())
        print(f"saved the state after {tokens.shape[1]} tokens to {args.save_state}; continue with "
              f"--resume-state {args.save_state}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while sampling: stop quietly, with the shell's status for SIGINT
        print(file=sys.stderr)
        sys.exit(130)
