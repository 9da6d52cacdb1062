"""config.py and main.py's reading of it: the INI schema, its one-line errors (exit 2), typed parsing,
value checks by name, and write/load round trips."""

import configparser
import dataclasses
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest

import config
import main
from config import ConfigError, parse_value, write_config
from data import DataConfig
from mamba_config import MambaConfig
from train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "[model]\nd_model = 32\nn_layer = 2\n"


def load_config(path, overrides=()):
    """(MambaConfig, DataConfig, TrainConfig) of a file, as main.py reads it."""
    loaded = config.load(path, main.SECTIONS, overrides, moved=main.MOVED)
    return tuple(loaded.build(section) for section in main.SECTIONS)


def run_main(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def ini(tmp_path, text, name="bad.ini") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


# Each case: (INI text, extra arguments, what the one error line must contain). None = no INI file.
BAD_INPUTS = {
    "unknown section": (MINIMAL + "[optim]\nlr = 1\n", [], ["bad.ini", "[optim]", "unknown section"]),
    "unknown key": (MINIMAL + "d_stat = 8\n", [], ["bad.ini", "[model] d_stat = 8", "unknown key"]),
    "wrong type": (MINIMAL + "d_state = abc\n", [], ["bad.ini", "[model] d_state = abc", "integer"]),
    "wrong bool": (MINIMAL + "conv_bias = maybe\n", [], ["[model] conv_bias = maybe", "true or false"]),
    "not a choice": (MINIMAL + "[data]\ntokenizer = word\n", [], ["[data] tokenizer = word", "byte, char"]),
    "d_state = 0": (MINIMAL + "d_state = 0\n", [], ["bad.ini", "[model] d_state = 0", "d_state must be > 0"]),
    "batch_size = 0": (MINIMAL + "[training]\nbatch_size = 0\n", [], ["[training] batch_size = 0"]),
    "lr < 0": (MINIMAL + "[training]\nlr = -1e-3\n", [], ["[training] lr = -1e-3"]),
    "val_fraction": (MINIMAL + "[data]\nval_fraction = 1.5\n", [], ["[data] val_fraction = 1.5"]),
    "moved key": (MINIMAL + "init_from = some/dir\n", [], ["bad.ini", "[model] init_from = some/dir",
                                                         "now a key of [training]"]),
    "min_lr > lr": (MINIMAL + "[training]\nmin_lr = 0.1\n", [], ["[training] min_lr = 0.1", "<= lr = 0.003"]),
    "missing file": (None, [], ["does_not_exist.ini"]),
    "--set syntax": (MINIMAL, ["--set", "training.lr"], ["--set training.lr", "section.key=value"]),
    "--set unknown key": (MINIMAL, ["--set", "model.colour=red"], ["--set model.colour=red", "unknown key"]),
    "--set bad value": (MINIMAL, ["--set", "model.d_state=-4"], ["--set model.d_state=-4", "d_state"]),
    "missing source": (MINIMAL, ["--set", "data.source=no/such/dir"], ["--set data.source=no/such/dir"]),
    "unknown task": (MINIMAL + "[data]\ntask = copying\n", [], ["[data] task = copying", "selective_copying"]),
    "task too long": (MINIMAL + "[data]\ntask = selective_copying\ntask_tokens = 200\n", [],
                      ["[data] task = selective_copying", "seq_len >= 2 * task_tokens = 400", "got 256"]),
    "task and init_from": (MINIMAL + "[data]\ntask = induction_heads\n", ["--set", "training.init_from=some/dir"],
                           ["bad.ini [data] task = induction_heads", "leave [training] init_from empty"]),
    "no such init_from": (MINIMAL, ["--set", "training.init_from=no/such/dir"],
                          ["--set training.init_from=no/such/dir: no/such/dir: no such directory"]),
}


# These run main.py as a real process; the rest call main.main() in-process (faster, same checks).
SUBPROCESS = {"unknown section", "unknown key", "wrong type", "d_state = 0", "missing file",
              "--set syntax", "missing source", "task too long"}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, capsys, monkeypatch):
    text, extra, needles = BAD_INPUTS[case]
    path = ini(tmp_path, text) if text is not None else str(tmp_path / "does_not_exist.ini")
    args = ["-c", path, "--set", f"data.cache_dir={tmp_path / 'cache'}", *extra]
    if case in SUBPROCESS:
        result = run_main(*args, cwd=tmp_path)
        status, stderr = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as info:
            main.main(args + ["--print-config"])  # should the check miss, print instead of training
        status, stderr = info.value.code, capsys.readouterr().err
    assert status == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_documents_the_options():
    result = run_main("--help")
    assert result.returncode == 0
    for option in ("--config", "--set", "--resume", "--print-config"):
        assert option in result.stdout


def test_corpus_too_short_for_seq_len_is_a_config_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc " * 100)
    result = run_main("-c", ini(tmp_path, MINIMAL), "--set", f"data.source={tmp_path / 'tiny.txt'}",
                      "--set", f"data.cache_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "seq_len = 256" in result.stderr


# ----------------------------------------------------------------------------------------------------
# Parsing, in-process


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("yes", True), ("on", True), ("1", True),
    ("false", False), ("FALSE", False), ("no", False), ("off", False), ("0", False)])
def test_bool_spellings(text, value):
    assert parse_value(text, bool) is value


def test_each_type_parses_and_rejects():
    assert parse_value("12", int) == 12 and parse_value("3e-4", float) == 3e-4
    assert parse_value("2", float) == 2.0 and parse_value("out/x y", str) == "out/x y"
    assert parse_value("auto", int | str) == "auto" and parse_value("8", int | str) == 8
    assert parse_value("ref", Literal["fast", "ref"]) == "ref"
    for text, tp in [("1.5", int), ("abc", int), ("", int), ("nan", float), ("inf", float),
                     ("x", float), ("2", bool), ("Fast", Literal["fast", "ref"])]:
        with pytest.raises(ValueError):
            parse_value(text, tp)


def test_load_config_types_and_overrides(tmp_path):
    path = ini(tmp_path, MINIMAL + "dt_rank = 8\nconv_bias = no\ntie_embeddings = On\nscan = ref\n"
                         "[training]\nlr = 1e-3   # an inline comment\ncompile = yes\n", "ok.ini")
    model_cfg, data_cfg, train_cfg = load_config(path, ["training.lr=2e-3", "training.lr=4e-3",
                                                        "data.tokenizer=char"])
    assert model_cfg.dt_rank == 8 and model_cfg.conv_bias is False
    assert model_cfg.tie_embeddings is True and model_cfg.scan == "ref"
    assert model_cfg.d_state == MambaConfig.d_state == 16  # the default
    assert train_cfg.lr == 4e-3 and train_cfg.compile is True  # the last --set wins
    assert data_cfg == DataConfig(tokenizer="char")


def test_vocab_size_is_not_a_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\] vocab_size = 300: unknown key"):
        load_config(ini(tmp_path, MINIMAL + "vocab_size = 300\n"))


def test_a_check_between_keys_names_the_key_that_was_set(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set training.lr=1e-05: .*min_lr"):
        load_config(ini(tmp_path, MINIMAL), ["training.lr=1e-05"])  # below the default min_lr


def test_write_config_round_trips(tmp_path):
    model_cfg = MambaConfig(d_model=48, n_layer=3, vocab_size=99, d_state=4, dt_rank=5, dt_min=0.01 + 0.02,
                            conv_bias=False, scan="ref")
    data_cfg = DataConfig(source="some dir/with spaces", tokenizer="char", val_fraction=1 / 3)
    train_cfg = TrainConfig(lr=3e-4, min_lr=1e-5, batch_size=3, compile=True, device="cpu")
    write_config(tmp_path / "run" / "config.ini", {"model": model_cfg, "data": data_cfg, "training": train_cfg})
    model_back, data_back, train_back = load_config(str(tmp_path / "run" / "config.ini"))
    assert replace(model_back, vocab_size=99) == model_cfg  # vocab_size is not a key: the tokenizer's
    assert data_back == data_cfg and train_back == train_cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.ini"]  # no temp file left


@pytest.mark.parametrize("name", ["config.ini", "configs/tiny.ini"])
def test_shipped_configs_parse(name):
    model_cfg, data_cfg, train_cfg = load_config(str(ROOT / name))
    assert data_cfg.source == "stdlib" and model_cfg.d_model > 0


def test_default_config_lists_every_key_with_its_default():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(ROOT / "config.ini", encoding="utf-8")
    for section, cls in main.SECTIONS.items():
        keys = config.schema(cls)
        assert list(parser[section]) == list(keys)
        for key, spec in keys.items():
            if spec.default is not dataclasses.MISSING:
                assert parse_value(parser[section][key], spec.type) == spec.default, key


# ----------------------------------------------------------------------------------------------------
# The checks the dataclasses make, from Python as from a file


@pytest.mark.parametrize("make, words", [
    (lambda: MambaConfig(d_state=2.5), "MambaConfig.d_state must be an integer, got 2.5"),
    (lambda: MambaConfig(conv_bias=1), "MambaConfig.conv_bias must be true or false, got 1"),
    (lambda: MambaConfig(dt_rank="big"), 'MambaConfig.dt_rank must be a positive integer or "auto", got \'big\''),
    (lambda: MambaConfig(dt_min=0.5), "MambaConfig.dt_max must be at least dt_min = 0.5, got 0.1"),
    (lambda: DataConfig(val_fraction=1.0), "DataConfig.val_fraction must be strictly between 0 and 1, got 1.0"),
    (lambda: DataConfig(source=" "), "DataConfig.source must be a non-empty string"),
    (lambda: TrainConfig(device="gpu"), "TrainConfig.device must be one of auto, cpu, cuda, mps, got 'gpu'"),
    (lambda: TrainConfig(lr=float("nan")), "TrainConfig.lr must be a number, got nan"),
])
def test_every_dataclass_refuses_a_bad_value_by_name(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value).startswith(words), str(info.value)


def test_a_required_key_that_is_missing_is_named(tmp_path):
    """The machinery is the dataclasses': a field without a default is a required key."""
    @dataclasses.dataclass
    class Needs:
        size: int = config.option(doc="a size")
        name: str = config.option("x", "a name")

    loaded = config.load(ini(tmp_path, "[toy]\nname = y\n"), {"toy": Needs})
    with pytest.raises(ConfigError, match=r"bad.ini \[toy\]: missing key 'size' \(an integer\)"):
        loaded.build("toy")
    assert config.load(ini(tmp_path, "[toy]\nsize = 3\n"), {"toy": Needs}).build("toy") == Needs(3, "x")


def test_where_names_the_default_a_key_took(tmp_path):
    loaded = config.load(ini(tmp_path, MINIMAL), main.SECTIONS, ["training.lr=1e-3"])
    assert loaded.where("training", "lr") == "--set training.lr=1e-3"
    assert loaded.where("model", "d_model") == f"{tmp_path / 'bad.ini'} [model] d_model = 32"
    assert loaded.where("data", "task") == f"{tmp_path / 'bad.ini'} [data] task = none (default)"


def test_a_warmup_longer_than_the_run_is_cut_to_it_with_a_note(tmp_path):
    result = run_main("-c", str(ROOT / "configs" / "tiny.ini"), "--set", "training.max_steps=3",
                      "--set", "training.warmup_steps=40", "--set", f"training.out_dir={tmp_path / 'out'}",
                      "--set", "training.eval_interval=3", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "note: warmup_steps = 40 is longer than the run (max_steps = 3): the warm-up is cut to 3" in result.stderr
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=40, max_steps=3)
    from train import lr_at
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-4])


def test_the_shipped_config_ini_is_the_schema_written_out():
    """config.ini documents every key; it is config_text of the defaults, so a changed doc or default must be
    written into it (below its header comment)."""
    text = (ROOT / "config.ini").read_text(encoding="utf-8")
    defaults = {section: cls() for section, cls in main.SECTIONS.items()}
    assert text[text.index("[model]"):] == config.config_text(defaults).rstrip("\n") + "\n"
