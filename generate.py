"""Sample text from a trained checkpoint:

    python generate.py --ckpt out/ckpt.pt --prompt "def " --max-new-tokens 300 --seed 1
    python generate.py --pretrained state-spaces/mamba-130m-hf --prompt "Mamba is" --top-k 40

--pretrained takes a directory in the original or the Hugging Face layout, or a hub name (see
pretrained.py), and its tokenizer.json (through the ``tokenizers`` package) instead of the byte tokenizer.

The prompt is read by one parallel scan (``model.prefill``), then every new token costs one
recurrent step (``model.step``: the convolution window and the SSM state h_t are the whole memory),
so the time per token stays the same however long the text grows. Text is printed as it is
sampled; with the byte tokenizer, bytes are decoded incrementally, so a character spread over
several UTF-8 bytes appears once its last byte arrives. The same seed gives the same text.

Exit status: 0 done; 2 bad input (missing or unreadable checkpoint or pretrained directory, empty
prompt, a character the char tokenizer does not know, an impossible sampling setting), reported in
one line on stderr.
"""
import argparse
import sys
import time

import torch

from cli import die, pick_device, read_text
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
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to sample per sample (default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divide the logits by this; 0 = always the most likely token (default: 0.8)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens whose probability reaches p")
    parser.add_argument("--seed", type=int, default=1337, help="random seed: same seed, same text (default: 1337)")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples to draw (default: 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else CPU")
    return parser.parse_args(argv)


def check_args(args) -> None:
    """One-line errors for settings argparse cannot judge alone (the sampling ones as model.py judges them)."""
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:  # "top_k must be >= 1, got 0" -> "--top-k must be ..."
        name, rest = str(e).split(" ", 1)
        die(f"--{name.replace('_', '-')} {rest}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--num-samples", args.num_samples)):
        if value < 1:
            die(f"{flag} must be >= 1, got {value}")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    prompt = args.prompt if args.prompt_file is None else read_text(args.prompt_file, "--prompt-file")
    if not prompt:
        die("the prompt is empty; the model needs at least one token to continue (the default is a newline)")
    device = pick_device(args.device, "--device")
    model, tokenizer = load_model(args.ckpt, args.pretrained, device)
    try:
        prompt_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)  # (1, l)
    except ValueError as e:  # a character the char tokenizer never saw
        die(f"prompt: {e}")
    if prompt_ids.shape[1] == 0:
        die("the prompt encodes to no tokens; give a longer prompt")

    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    generator = torch.Generator(device).manual_seed(args.seed)
    n_tokens, started = 0, time.perf_counter()
    for i in range(args.num_samples):
        sys.stdout.write(SEPARATOR if i else "")
        sys.stdout.write(prompt)
        new_ids = (int(t[0]) for t in model.stream(prompt_ids, args.max_new_tokens, args.temperature,
                                                    args.top_k, args.top_p, generator))
        for piece in tokenizer.decode_pieces(new_ids):
            sys.stdout.write(piece)
            sys.stdout.flush()
        n_tokens += args.max_new_tokens
    sys.stdout.write("\n")
    seconds = time.perf_counter() - started
    print(f"sampled {n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s on {device}",
          file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while sampling: stop quietly, with the shell's status for SIGINT
        print(file=sys.stderr)
        sys.exit(130)
