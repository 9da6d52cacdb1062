"""The INI configuration: a schema read off dataclasses, and config files read, checked and written.

The schema is not written down twice. Each section of config.ini is one dataclass ([model] MambaConfig in
model.py, [data] DataConfig in data.py, [training] TrainConfig in train.py; main.py pairs them), and each
key is one field declared with ``option``:

    d_state: int = option(16, "SSM state size per channel (N in the paper)", POSITIVE)

Its annotation is the key's type (bool, int, float, str, ``int | str``, ``Literal[...]`` choices), its
default the key's default, its doc the comment written above it in config.ini, and its check the values it
takes. ``check_fields(self)`` in each ``__post_init__`` enforces type and check, so a wrong value is refused
by name whether it comes from Python or from a file. Fields declared ``derived=True`` are not keys (the
vocabulary size: the tokenizer decides it).

``load`` reads a file plus ``--set section.key=value`` overrides and remembers where every value came from,
so that any later mistake, however deep in the setup it is found, is reported as one line naming the line
of the file or the --set to change. Nothing here knows what the sections mean.
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import re
import tempfile
import textwrap
import types
import typing
from pathlib import Path

BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

# Checks: (predicate, what a good value is). The predicate sees a value of the field's type.
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 < v < 1, "strictly between 0 and 1")
BETA = (lambda v: 0 <= v < 1, "in [0, 1)")
NOT_BLANK = (lambda v: bool(v.strip()), "a non-empty string")


class ConfigError(ValueError):
    """A configuration mistake: the message is the one line printed after "error: ". ``section`` and
    ``key`` (when known) name the key to blame, which ``Loaded.where`` turns into a file line or a --set."""

    def __init__(self, message: str, section: str | None = None, key: str | None = None):
        super().__init__(message)
        self.section, self.key = section, key


def option(default=dataclasses.MISSING, doc: str = "", check=None, derived: bool = False):
    """A dataclass field that is an INI key (or, with derived=True, a field that is not)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "derived": derived})


def must(obj, name: str, ok: bool, expected: str) -> None:
    """Raise the project's one kind of value error: "MambaConfig.d_state must be > 0, got 0"."""
    if not ok:
        raise ValueError(f"{type(obj).__name__}.{name} must be {expected}, got {getattr(obj, name)!r}")


def check_fields(obj) -> None:
    """Check every field of a dataclass instance against its annotation and its option's check."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        must(obj, f.name, is_instance(value, tp), describe(tp))
        check = f.metadata.get("check")
        if check is not None:
            must(obj, f.name, check[0](value), check[1])


def is_instance(value, tp) -> bool:
    """isinstance for the annotations a key can have; an int is a fine float, a bool is not an int."""
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(is_instance(value, member) for member in typing.get_args(tp))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp) and (tp is bool or not isinstance(value, bool))


# ----------------------------------------------------------------------------------------------------
# The schema, and text <-> typed values


@dataclasses.dataclass
class Key:
    """One INI key, read off one dataclass field."""

    type: typing.Any  # the resolved annotation
    default: typing.Any  # dataclasses.MISSING when the key is required
    doc: str


def schema(cls: type) -> dict[str, Key]:
    """The INI keys of one section's dataclass, in field order."""
    hints = typing.get_type_hints(cls)  # resolves annotations written as strings
    return {f.name: Key(hints[f.name], f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls) if f.init and not f.metadata.get("derived")}


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
# Reading


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


class Loaded:
    """A config file with its --set overrides applied: the typed values given, section by section, and
    where each came from. ``build`` makes a section's dataclass; ``where`` names a key for an error."""

    def __init__(self, path: str, sections: dict[str, type], values: dict, origin: dict):
        self.path, self.sections = path, sections
        self.values = values  # section -> {key: typed value}, only the keys given
        self.origin = origin  # (section, key) -> "file [section] key = text" or "--set section.key=text"

    def where(self, section: str, key: str) -> str:
        """The line or --set that gave this key, or the default it took."""
        if (section, key) in self.origin:
            return self.origin[section, key]
        default = schema(self.sections[section])[key].default
        return f"{self.path} [{section}] {key} = {format_value(default)} (default)"

    def build(self, section: str):
        """The section's dataclass from the values given and the defaults; a ConfigError blaming the
        first key the failed check names, preferring keys that were set ("min_lr must be <= lr ...")."""
        cls, keys = self.sections[section], schema(self.sections[section])
        for key, spec in keys.items():
            if key not in self.values[section] and spec.default is dataclasses.MISSING:
                raise ConfigError(f"{self.path} [{section}]: missing key {key!r} ({describe(spec.type)})")
        try:
            return cls(**self.values[section])
        except ValueError as e:
            named = sorted(((section, k) not in self.origin, m.start(), k) for k in keys
                           if (m := re.search(rf"\b{re.escape(k)}\b", str(e))))
            place = self.where(section, named[0][2]) if named else f"{self.path} [{section}]"
            raise ConfigError(f"{place}: {e}") from None


def load(path: str, sections: dict[str, type], overrides=(), moved=None) -> Loaded:
    """Read ``path`` and apply ``overrides`` ("section.key=value" strings; later ones win), checking every
    section, key and value type against ``sections`` (INI section -> dataclass). ``moved`` maps an old
    (section, key) to the section it moved to, so an old file is told where the key went."""
    raw = {}  # (section, key) -> (text, where it came from): the file first, each --set on top
    for section, values in _read_ini(path).items():
        for key, text in values.items():
            raw[section, key] = text, f"{path} [{section}] {key} = {text}"
    for text in overrides:
        section, key, value = _parse_override(text)
        raw[section, key] = value, f"--set {section}.{key}={value}"

    values = {section: {} for section in sections}
    for (section, key), (text, where) in raw.items():
        if (section, key) in (moved or {}):
            raise ConfigError(f"{where}: {key} is now a key of [{moved[section, key]}]; move the line there")
        if section not in sections:
            raise ConfigError(f"{where}: unknown section [{section}]; expected "
                              + ", ".join(f"[{s}]" for s in sections))
        keys = schema(sections[section])
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} in [{section}]; known keys: " + ", ".join(keys))
        try:
            values[section][key] = parse_value(text, keys[key].type)
        except ValueError:
            raise ConfigError(f"{where}: expected {describe(keys[key].type)}") from None
    return Loaded(path, sections, values, {k: where for k, (_, where) in raw.items()})


# ----------------------------------------------------------------------------------------------------
# Writing


def config_text(configs: dict) -> str:
    """INI text of ``configs`` (section -> dataclass instance), each key after its doc and type."""
    lines = []
    for section, cfg in configs.items():
        lines.append(f"[{section}]")
        for key, spec in schema(type(cfg)).items():
            lines += textwrap.wrap(f"{spec.doc} ({describe(spec.type)})", 98,
                                   initial_indent="# ", subsequent_indent="# ")
            lines.append(f"{key} = {format_value(getattr(cfg, key))}".rstrip())
        lines.append("")
    return "\n".join(lines)


def write_config(path, configs: dict) -> None:
    """Write ``configs`` to ``path`` atomically (temp file, then rename); ``load`` reads it back to equal
    dataclasses. The trainer puts one beside its checkpoints: the run's resolved configuration."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# baby_mamba: the resolved configuration of this run (python main.py -c THIS_FILE)\n\n")
        f.write(config_text(configs))
    os.replace(tmp, path)
