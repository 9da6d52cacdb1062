"""Train baby_mamba from an INI file:  python main.py -c config.ini [--set section.key=value]... [--resume]

The INI schema is not written down twice: it is read off the dataclass fields of ``MambaConfig``
([model], model.py), ``DataConfig`` ([data], data.py) and ``TrainConfig`` ([training], train.py). A
field's annotation is its key's type (bool, int, float, str, ``int | str``, ``Literal[...]`` choices),
its default the key's default, and ``metadata["doc"]`` its documentation. Value checks (d_state > 0,
lr > 0, ...) live in the dataclasses' ``__post_init__``; this file only points each failure at the
line of the file, or the ``--set``, it came from. ``vocab_size`` is not a key: the tokenizer decides it.
With ``[model] init_from`` (fine-tuning), the pretrained config.json gives the architecture (d_model and
n_layer are then not required) and its tokenizer replaces ``[data] tokenizer``.

Every mistake (unknown section or key, wrong type, impossible value, missing file, unusable data
source) is reported as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import math
import os
import re
import sys
import tempfile
import textwrap
import types
import typing
from pathlib import Path

import tasks
from data import DataConfig, DataError, load_dataset
from model import MambaConfig
from pretrained import PretrainedError, init_config

DERIVED = {"model": {"vocab_size": 256}}  # not INI keys; the value stands in while checking the rest
BOOLS = {"true": True, "yes": True, "on": True, "1": True,
         "false": False, "no": False, "off": False, "0": False}


class ConfigError(Exception):
    """A config mistake; its message is the one line printed after "error: "."""


def sections() -> dict[str, type]:
    """INI section -> dataclass. train.py imports write_config from this file, so TrainConfig is
    imported here, when called, rather than at the top (which would be an import cycle)."""
    from train import TrainConfig
    return {"model": MambaConfig, "data": DataConfig, "training": TrainConfig}


@dataclasses.dataclass
class Key:
    """One INI key, read off one dataclass field."""

    type: typing.Any  # the resolved annotation: bool, int, float, str, a Union or a Literal
    default: typing.Any  # dataclasses.MISSING when the key is required
    doc: str


def schema(section: str, cls: type) -> dict[str, Key]:
    """The INI keys of one section, in field order."""
    hints = typing.get_type_hints(cls)  # resolves annotations written as strings
    return {f.name: Key(hints[f.name], f.default if f.default_factory is dataclasses.MISSING
                        else f.default_factory(), f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls) if f.init and f.name not in DERIVED.get(section, {})}


# ----------------------------------------------------------------------------------------------------
# Text <-> typed values


def describe(tp) -> str:
    """What a value of type ``tp`` looks like, for error messages and comments."""
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(t) for t in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def parse_value(text: str, tp):
    """INI text -> a value of type ``tp``; a bare ValueError when the text is not one."""
    if typing.get_origin(tp) is typing.Literal:
        for choice in typing.get_args(tp):
            if text == str(choice):
                return choice
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):  # in annotation order: `int | str` tries int first
            try:
                return parse_value(text, member)
            except ValueError:
                pass
    elif tp is bool and text.lower() in BOOLS:
        return BOOLS[text.lower()]
    elif tp is int:
        return int(text)
    elif tp is float and math.isfinite(float(text)):
        return float(text)
    elif tp is str:
        return text
    raise ValueError


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)  # repr: reads back exactly


# ----------------------------------------------------------------------------------------------------
# Reading and writing config files


def _read_ini(path: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive, like the field names they are
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except configparser.Error as e:  # no section header, a key given twice, ...
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if parser.defaults():
        raise ConfigError(f"{path}: unknown section [{parser.default_section}]")
    return {name: dict(parser[name]) for name in parser.sections()}


def _parse_override(text: str) -> tuple[str, str, str]:
    match = re.fullmatch(r"\s*(\w+)\.(\w+)\s*=(.*)", text, flags=re.DOTALL)
    if not match:
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. training.lr=3e-4")
    return match[1], match[2], match[3].strip()


def load_config(path: str, overrides=()) -> tuple[dict, DataConfig, typing.Any]:
    """Read ``path``, apply ``overrides`` ("section.key=value" strings; later ones win) and check.

    Returns ``(model_kwargs, DataConfig, TrainConfig)``: the model's fields as a dict, because
    ``MambaConfig(vocab_size=tokenizer.vocab_size, **model_kwargs)`` needs the tokenizer first.
    Raises ConfigError with one line naming the file (or the --set), the section and the key.
    """
    classes = sections()
    raw = {}  # (section, key) -> (text, where it came from): the file first, each --set on top
    for section, values in _read_ini(path).items():
        for key, text in values.items():
            raw[section, key] = text, f"{path} [{section}] {key} = {text}"
    for text in overrides:
        section, key, value = _parse_override(text)
        raw[section, key] = value, f"--set {section}.{key}={value}"

    parsed = {section: {} for section in classes}
    for (section, key), (text, where) in raw.items():
        if section not in classes:
            raise ConfigError(f"{where}: unknown section [{section}]; expected "
                              + ", ".join(f"[{s}]" for s in classes))
        keys = schema(section, classes[section])
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} in [{section}]; known keys: "
                              + ", ".join(keys))
        try:
            parsed[section][key] = parse_value(text, keys[key].type)
        except ValueError:
            raise ConfigError(f"{where}: expected {describe(keys[key].type)}") from None

    if parsed["model"].get("init_from"):  # the pretrained config.json gives the sizes; main() reads it
        parsed["model"] = {"d_model": 1, "n_layer": 1, **parsed["model"]}  # placeholders, so none is required
    configs = {}
    for section, cls in classes.items():
        keys = schema(section, cls)
        for key, spec in keys.items():
            if key not in parsed[section] and spec.default is dataclasses.MISSING:
                raise ConfigError(f"{path} [{section}]: missing key {key!r} ({describe(spec.type)})")
        try:  # __post_init__ checks the values
            configs[section] = cls(**parsed[section], **DERIVED.get(section, {}))
        except ValueError as e:
            raise ConfigError(f"{_blame(str(e), section, keys, raw, path)}: {e}") from None
    model_kwargs = {key: getattr(configs["model"], key) for key in schema("model", MambaConfig)}
    return model_kwargs, configs["data"], configs["training"]


def _blame(message: str, section: str, keys: dict[str, Key], raw: dict, path: str) -> str:
    """Where a __post_init__ ValueError points: the first key its message names, preferring keys
    the user set (in the file or a --set) over defaults ("min_lr must be <= lr" after --set lr=...)."""
    hits = sorted(((section, k) not in raw, m.start(), k) for k in keys
                  if (m := re.search(rf"\b{re.escape(k)}\b", message)))
    if not hits:
        return f"{path} [{section}]"
    key = hits[0][2]
    if (section, key) in raw:
        return raw[section, key][1]
    return f"{path} [{section}] {key} = {format_value(keys[key].default)} (default)"


def config_text(model_cfg, data_cfg, train_cfg) -> str:
    """The resolved config as INI text, each key after its doc (and type) as a comment."""
    lines = []
    for (section, cls), cfg in zip(sections().items(), (model_cfg, data_cfg, train_cfg)):
        lines.append(f"[{section}]")
        for key, spec in schema(section, cls).items():
            lines += textwrap.wrap(f"{spec.doc} ({describe(spec.type)})", 98,
                                   initial_indent="# ", subsequent_indent="# ")
            lines.append(f"{key} = {format_value(getattr(cfg, key))}")
        lines.append("")
    return "\n".join(lines)


def write_config(path, model_cfg, data_cfg, train_cfg) -> None:
    """Write the resolved config to ``path`` atomically (temp file, then rename); load_config reads
    it back to equal configs. train.py calls this to put config.ini beside the checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# baby_mamba: the resolved configuration of this run (python main.py -c THIS_FILE)\n\n")
        f.write(config_text(model_cfg, data_cfg, train_cfg))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Command line


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


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _where(args, section: str, key: str, value) -> str:
    """How to name a key in an error found after loading: by its --set if it had one."""
    flags = [text for text in args.set if _parse_override(text)[:2] == (section, key)]
    return f"--set {flags[-1].strip()}" if flags else f"{args.config} [{section}] {key} = {value}"


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        model_kwargs, data_cfg, train_cfg = load_config(args.config, args.set)
    except ConfigError as e:
        fail(str(e))
    model_cfg, tokenizer = MambaConfig(**DERIVED["model"], **model_kwargs), None
    if model_cfg.init_from and data_cfg.task != "none":
        fail(f"{_where(args, 'data', 'task', data_cfg.task)}: a task trains a model from scratch; "
             "leave [model] init_from empty")
    if model_cfg.init_from:  # a pretrained model: its config.json and tokenizer replace ours
        try:
            model_cfg, tokenizer = init_config(model_cfg)
        except PretrainedError as e:
            fail(f"{_where(args, 'model', 'init_from', model_cfg.init_from)}: {e}")
    if args.print_config:
        print(config_text(model_cfg, data_cfg, train_cfg))
        return
    if data_cfg.task != "none":  # a synthetic task: no corpus, but sizes the task must fit
        problem = tasks.check(data_cfg.task, data_cfg.task_vocab, data_cfg.task_tokens, train_cfg.seq_len)
        if problem:
            fail(f"{_where(args, 'data', 'task', data_cfg.task)}: {problem}")
        model_cfg = MambaConfig(vocab_size=data_cfg.task_vocab, **model_kwargs)
    else:
        # Encode the corpus here (once; later runs reuse the cache), so that a bad source or a corpus
        # too short for seq_len is a one-line error, not a traceback from inside training.
        try:
            dataset = load_dataset(data_cfg, tokenizer)
        except DataError as e:
            fail(f"{_where(args, 'data', 'source', data_cfg.source)}: {e}")
        shortest = min(len(dataset.train), len(dataset.val))
        if shortest < train_cfg.seq_len + 1:
            fail(f"{_where(args, 'training', 'seq_len', train_cfg.seq_len)}: a split of the corpus has "
                 f"only {shortest} tokens; use a smaller seq_len, a longer corpus or a larger val_fraction")
        if tokenizer is None:
            model_cfg = MambaConfig(vocab_size=dataset.tokenizer.vocab_size, **model_kwargs)

    import train

    if os.environ.get("RANK", "0") == "0":  # under torchrun, only the first process prints
        print(config_text(model_cfg, data_cfg, train_cfg))
    train.train(model_cfg, data_cfg, train_cfg, resume=args.resume)


if __name__ == "__main__":
    main()
