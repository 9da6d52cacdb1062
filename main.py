"""Train from an INI file:  python main.py -c config.ini [--set section.key=value]... [--resume] [--print-config]

What a run needs is resolved here, once, before training starts, and train.train receives the result:
  1. the file and its --set overrides, checked against the schema (config.py): [model] is MambaConfig
     (model.py), [data] DataConfig (data.py), [training] TrainConfig (train.py);
  2. ``resolve``: the architecture and vocabulary (a pretrained config.json with [training] init_from, else
     [model] with the tokenizer's vocabulary), the tokenizer (the pretrained one, a task's symbols, or
     [data] tokenizer over the corpus) and the batches (the encoded corpus, or a task generated on the fly);
  3. ``prepare``: the model built from them, with the pretrained weights for init_from.

Every mistake (unknown section or key, wrong type, impossible value, missing file, unusable data source,
a pretrained directory that cannot be read) is one line on stderr naming the line of the file or the --set
to change, with exit status 2, never a traceback.
"""
import argparse
import os
import sys
from dataclasses import replace

import torch

import tasks
from cli import die
from config import ConfigError, config_text, load
from data import Batches, DataConfig, DataError, load_dataset
from mamba_config import MambaConfig
from pretrained import PretrainedError, build_model, read_config, read_tokenizer, resolve
from tokenizer import TaskTokenizer
from train import Run, TrainConfig, train

SECTIONS = {"model": MambaConfig, "data": DataConfig, "training": TrainConfig}
MOVED = {("model", "init_from"): "training"}  # keys that changed section: an old file is told where they went


def resolve_run(model_cfg: MambaConfig, data_cfg: DataConfig, train_cfg: TrainConfig):
    """(configs as trained: section -> dataclass, the tokenizer, the batches, the pretrained directory to
    take the initial weights from or None). A ConfigError names the key to blame."""
    pretrained_dir, task = None, data_cfg.task != "none"
    if train_cfg.init_from and task:
        raise ConfigError("a task trains a model from scratch; leave [training] init_from empty", "data", "task")
    if train_cfg.init_from:  # a published model: its config.json and tokenizer replace ours
        try:
            pretrained_dir = resolve(train_cfg.init_from)
            model_cfg = replace(read_config(pretrained_dir), scan=model_cfg.scan)
            tokenizer = read_tokenizer(pretrained_dir)
        except PretrainedError as e:
            raise ConfigError(str(e), "training", "init_from") from None
        if tokenizer.vocab_size > model_cfg.padded_vocab_size:
            raise ConfigError(f"{pretrained_dir}: its tokenizer has {tokenizer.vocab_size} ids, more than the "
                              f"{model_cfg.padded_vocab_size} rows of the embedding", "training", "init_from")
    if task:
        problem = tasks.check(data_cfg.task, data_cfg.task_vocab, data_cfg.task_tokens, train_cfg.seq_len)
        if problem:
            raise ConfigError(problem, "data", "task")
        tokenizer, dataset = TaskTokenizer(data_cfg.task, data_cfg.task_vocab), None
    else:
        # Encoded here, once (later runs reuse the cache), so that a bad source or a corpus too short for
        # seq_len is a one-line error, not a traceback from inside training.
        try:
            dataset = load_dataset(data_cfg, tokenizer if pretrained_dir else None)
        except DataError as e:
            raise ConfigError(str(e), "data", "source") from None
        shortest = min(len(dataset.train), len(dataset.val))
        if shortest < train_cfg.seq_len + 1:
            raise ConfigError(f"a split of the corpus has only {shortest} tokens; use a smaller seq_len, a longer "
                              "corpus or a larger val_fraction", "training", "seq_len")
        tokenizer = dataset.tokenizer
    if pretrained_dir is None:
        model_cfg = replace(model_cfg, vocab_size=tokenizer.vocab_size)  # the tokenizer decides it
    batches = Batches(data_cfg, dataset, train_cfg.batch_size, train_cfg.seq_len)
    return {"model": model_cfg, "data": data_cfg, "training": train_cfg}, tokenizer, batches, pretrained_dir


def prepare(model_cfg: MambaConfig, data_cfg: DataConfig, train_cfg: TrainConfig, resume: bool = False) -> Run:
    """Everything train.train needs: resolve_run, then the model built with the run's seed (the same initial
    weights in every process) and, for init_from, the pretrained weights (not when resuming: the
    checkpoint has newer ones)."""
    configs, tokenizer, batches, pretrained_dir = resolve_run(model_cfg, data_cfg, train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(configs["model"])
    if pretrained_dir is not None and not resume:
        model.load_pretrained_weights(pretrained_dir)
    return Run(model, tokenizer, batches, configs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a Mamba language model as an INI file says. config.ini lists every "
                    "key of [model], [data] and [training] with its default and meaning.")
    parser.add_argument("-c", "--config", default="config.ini", help="INI file (default: config.ini)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key, e.g. --set training.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in [training] out_dir")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, documented) and exit")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"  # under torchrun, only the first process prints
    try:
        loaded = load(args.config, SECTIONS, args.set, moved=MOVED)
        model_cfg, data_cfg, train_cfg = (loaded.build(section) for section in SECTIONS)
        if args.print_config:
            print(config_text(resolve_run(model_cfg, data_cfg, train_cfg)[0]))
            return
        run = prepare(model_cfg, data_cfg, train_cfg, resume=args.resume)
    except ConfigError as e:
        die(f"{loaded.where(e.section, e.key)}: {e}" if e.key else str(e))
    if first:
        print(config_text(run.configs))
        if train_cfg.warmup_steps > train_cfg.max_steps:
            print(f"note: warmup_steps = {train_cfg.warmup_steps} is longer than the run (max_steps = "
                  f"{train_cfg.max_steps}): the warm-up is cut to {train_cfg.max_steps} steps", file=sys.stderr)
    train(run, resume=args.resume)


if __name__ == "__main__":
    main()
