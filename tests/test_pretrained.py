"""pretrained.py: published checkpoints in both layouts load with transformers' logits, our saves load in
transformers, bad directories fail in one line, generate.py --pretrained reproduces transformers' greedy
output, and training checkpoints export and fine-tune (init_from). Everything local and tiny: the models
are random transformers.MambaForCausalLM, the tokenizer a small BPE trained here."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaForCausalLM
from transformers import MambaConfig as HFMambaConfig

import main
from data import Batches, DataConfig, load_dataset
from mamba_config import MambaConfig
from model import MambaLM
from pretrained import PretrainedError, load_checkpoint, load_pretrained, read_config, read_tokenizer
from runs import train_run
from tokenizer import HFTokenizer
from train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
SENTENCES = ["the cat sat on the mat.", "the dog ran to the red house.", "a small green tree stood by the hill.",
             "mamba reads the text one token at a time.", "the state carries what the model remembers."]
CORPUS = " ".join(SENTENCES[i % 5] for i in range(7 * 400))


def random_hf_model(vocab_size=100, seed=0, **overrides) -> MambaForCausalLM:
    """A small random MambaForCausalLM whose mixers' projections are scaled up: at init the mixers add
    little to the residual stream, and greedy decoding soon repeats one token; this way it wanders."""
    torch.manual_seed(seed)
    config = HFMambaConfig(**{"vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 8,
                              "eos_token_id": None, **overrides})
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.in_proj.weight.mul_(3)
            layer.mixer.out_proj.weight.mul_(3)
    return model


def bpe_tokenizer_json() -> str:
    """A byte-level BPE of about 100 tokens trained on a few sentences (GPT-NeoX's kind, in miniature)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=100, show_progress=False))
    return tok.to_str()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory written by transformers' save_pretrained, with a tokenizer.json, the model)."""
    folder = tmp_path_factory.mktemp("hf")
    (folder / "tokenizer.json").write_text(bpe_tokenizer_json(), encoding="utf-8")
    model = random_hf_model(HFTokenizer((folder / "tokenizer.json").read_text()).vocab_size)
    model.save_pretrained(folder)
    return folder, model


def run_script(script, *args):
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, encoding="utf-8", timeout=120)


def assert_one_line_exit_2(result, *words):
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def test_transformers_checkpoint_loads_with_the_same_logits(hf_dir):
    folder, hf = hf_dir
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    ours = MambaLM.from_pretrained(folder)
    assert ours.config.vocab_size == ours.config.padded_vocab_size == hf.config.vocab_size
    ids = torch.randint(hf.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads(hf_dir, tmp_path):
    hf = hf_dir[1]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # as the larger published models are stored
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(hf.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(load_pretrained(tmp_path), ids), logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [
    {},  # tied, vocabulary 97 padded to 104 rows
    {"tie_embeddings": False, "bias": True, "conv_bias": False, "dt_rank": 7, "d_conv": 3, "expand": 3, "d_state": 4},
])
def test_our_save_pretrained_loads_in_transformers(overrides, tmp_path):
    torch.manual_seed(0)
    ours = MambaLM(MambaConfig(**{"d_model": 64, "n_layer": 2, "vocab_size": 97, **overrides})).eval()
    ours.save_pretrained(tmp_path)
    hf = MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(97, (2, 19), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(hf, ids), logits(ours, ids), atol=1e-5, rtol=0)
    back = MambaLM.from_pretrained(tmp_path)  # and back: the unpadded vocabulary survives the trip
    assert (back.config.vocab_size, back.config.padded_vocab_size) == (97, ours.config.padded_vocab_size)
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), atol=0, rtol=0)


def test_without_safetensors_the_weights_go_to_pytorch_model_bin(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ours = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=100)).eval()
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if safetensors were not installed
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    ids = torch.randint(100, (1, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(MambaLM.from_pretrained(tmp_path), ids), logits(ours, ids), atol=0, rtol=0)
    monkeypatch.undo()
    torch.testing.assert_close(logits(MambaForCausalLM.from_pretrained(tmp_path).eval(), ids), logits(ours, ids),
                               atol=1e-5, rtol=0)


def test_original_layout_loads_with_the_same_logits(hf_dir, tmp_path):
    """config.json and pytorch_model.bin as mamba_ssm writes them: its own key names, lm_head stored
    too, and vocab_size the tokenizer's (here 97 for 100 embedding rows, as 50277 for 50280)."""
    hf = random_hf_model(100, seed=3)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = {"d_model": 64, "n_layer": 2, "vocab_size": 97, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 4, "tie_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(tmp_path)
    assert (ours.config.vocab_size, ours.config.padded_vocab_size, ours.config.d_state) == (97, 100, 8)
    ids = torch.randint(97, (2, 21), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Errors: one line naming the file or the keys


def broken_copy(src: Path, dst: Path, case: str) -> list[str]:
    """dst = src broken as ``case`` says; returns words the error must contain."""
    dst.mkdir()
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    config = json.loads((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    if case == "no config.json":
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return [str(dst / "config.json"), "no such file"]
    if case == "corrupt":
        (dst / "config.json").write_text(json.dumps(config))
        (dst / "model.safetensors").write_bytes(b"\x00not safetensors")
        return [str(dst / "model.safetensors"), "not a readable weight file"]
    if case == "shapes":
        config["state_size"] = 16
        words = ["does not match", "backbone.layers.0.mixer.A_log is (128, 8), the config needs (128, 16)"]
    elif case == "missing key":
        del state["backbone.layers.1.mixer.D"]
        words = ["missing backbone.layers.1.mixer.D"]
    else:
        state["backbone.layers.0.mixer.extra"] = torch.zeros(3)
        words = ["unexpected backbone.layers.0.mixer.extra"]
    (dst / "config.json").write_text(json.dumps(config))
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return [str(dst / "model.safetensors"), *words]


@pytest.mark.parametrize("case", ["no config.json", "corrupt", "shapes", "missing key", "unexpected key"])
def test_a_broken_directory_is_one_line_naming_the_file_and_keys(case, hf_dir, tmp_path):
    words = broken_copy(hf_dir[0], tmp_path / "broken", case)
    with pytest.raises(PretrainedError) as info:
        load_pretrained(tmp_path / "broken")
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


def test_generate_reports_a_broken_directory_in_one_line(hf_dir, tmp_path):
    words = broken_copy(hf_dir[0], tmp_path / "broken", "shapes")
    result = run_script("generate.py", "--device", "cpu", "--pretrained", tmp_path / "broken")
    assert_one_line_exit_2(result, *words)
    both = run_script("generate.py", "--ckpt", "x.pt", "--pretrained", hf_dir[0])
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_names_that_are_neither_directories_nor_downloadable(tmp_path, monkeypatch):
    with pytest.raises(PretrainedError, match="no such directory$"):
        load_pretrained(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(PretrainedError, match="pip install huggingface_hub, or download config.json") as info:
        load_pretrained("state-spaces/mamba-130m-hf")
    assert "\n" not in str(info.value)


def test_a_tokenizer_json_without_the_tokenizers_package_says_what_to_install(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(PretrainedError, match="tokenizer.json needs the tokenizers package: pip install tokenizers"):
        read_tokenizer(hf_dir[0])


@pytest.mark.parametrize("config, words", [
    ({"d_model": 64, "n_layer": 2, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba3"}}, "only Mamba1 and Mamba2"),
    ({"d_model": 64, "n_layer": 2, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}},
     r"ssm_cfg D_has_hdim = True: only the official default \(False\)"),
    ({"d_model": 64, "n_layer": 2, "vocab_size": 10, "attn_layer_idx": [1]}, "hybrid models"),
    ({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 8, "head_dim": 16,
      "vocab_size": 10, "layer_types": ["mamba", "attention"]}, "attention layers: hybrid models"),
])
def test_unsupported_variants_are_named(config, words, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match=words):
        read_config(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Mamba-2: transformers' Mamba2ForCausalLM and mamba_ssm's layout (ssm_cfg layer Mamba2)


def random_hf_mamba2(seed=0, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(**{"vocab_size": 100, "hidden_size": 64, "num_heads": 8, "head_dim": 16, "state_size": 16,
                             "n_groups": 2, "chunk_size": 16, "num_hidden_layers": 2, "eos_token_id": None,
                             **overrides})
    model = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # mixers loud enough to matter against the residual stream
        for layer in model.backbone.layers:
            layer.mixer.in_proj.weight.mul_(3)
            layer.mixer.out_proj.weight.mul_(3)
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "use_conv_bias": False, "n_groups": 1}])
def test_transformers_mamba2_loads_and_saves_with_the_same_logits(overrides, tmp_path):
    hf = random_hf_mamba2(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = MambaLM.from_pretrained(tmp_path / "hf")
    assert ours.config.layer == "mamba2" and ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(100, (2, 37), generator=torch.Generator().manual_seed(3))  # 37: not a multiple of 16
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), rtol=1e-4, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")  # and back into transformers
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), rtol=1e-4, atol=1e-5)


def test_mamba_ssm_mamba2_layout_loads_with_the_same_logits(tmp_path):
    """config.json as mamba_ssm writes it (ssm_cfg layer Mamba2; vocab_size 97 for 100 rows) and pytorch_model.bin
    under its names, lm_head stored too."""
    hf = random_hf_mamba2(seed=4, tie_word_embeddings=True)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 64, "n_layer": 2, "vocab_size": 97, "pad_vocab_size_multiple": 4, "rms_norm": True,
        "tie_embeddings": True, "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2,
                                            "chunk_size": 16}}))
    ours = load_pretrained(tmp_path)
    assert (ours.config.vocab_size, ours.config.padded_vocab_size) == (97, 100)
    ids = torch.randint(97, (1, 29), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# generate.py --pretrained


def test_generate_pretrained_reproduces_transformers_greedy_output(hf_dir):
    folder, hf = hf_dir
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt, n = "the cat sat", 30
    ids = torch.tensor([tok.encode(prompt).ids])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    assert expected.shape[1] == ids.shape[1] + n
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 5  # a sequence worth comparing, not one token repeated

    ours = MambaLM.from_pretrained(folder).generate(ids, n, temperature=0)
    assert ours.tolist() == expected.tolist()  # token for token
    result = run_script("generate.py", "--device", "cpu", "--pretrained", folder, "--prompt", prompt,
                        "--max-new-tokens", n, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + tok.decode(expected[0, ids.shape[1]:].tolist()) + "\n"


# ----------------------------------------------------------------------------------------------------
# Training checkpoints: export, and fine-tuning from a pretrained directory


def tiny_train(out_dir, steps) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), device="cpu", batch_size=4, seq_len=32, max_steps=steps, lr=1e-3,
                       min_lr=1e-4, warmup_steps=1, eval_interval=steps, eval_batches=2, ckpt_interval=steps)


def test_fine_tune_from_a_transformers_directory_then_export(hf_dir, tmp_path):
    folder, hf = hf_dir
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    ini = tmp_path / "finetune.ini"  # no d_model, no n_layer: the pretrained config.json gives them
    ini.write_text(f"[data]\nsource = {tmp_path / 'corpus.txt'}\n"
                   f"cache_dir = {tmp_path / 'cache'}\nval_fraction = 0.1\n[training]\ninit_from = {folder}\n"
                   f"out_dir = {tmp_path / 'out'}\n"
                   "device = cpu\nbatch_size = 4\nseq_len = 32\nmax_steps = 3\nlr = 1e-3\nmin_lr = 1e-4\n"
                   "warmup_steps = 1\neval_interval = 3\neval_batches = 2\nckpt_interval = 3\n")
    main.main(["-c", str(ini)])

    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["model"]["d_model"] == 64 and ckpt["config"]["training"]["init_from"] == str(folder)
    assert ckpt["tokenizer"]["kind"] == "hf"
    # Step 0 was evaluated with the pretrained weights: the same loss as transformers' model on those batches.
    cfg = TrainConfig(**ckpt["config"]["training"])
    data_cfg = DataConfig(**ckpt["config"]["data"])
    data = load_dataset(data_cfg, HFTokenizer((folder / "tokenizer.json").read_text()))
    batches = Batches(data_cfg, data, cfg.batch_size, cfg.seq_len).validation(cfg.eval_batches, cfg.seed)
    losses = [F.cross_entropy(logits(hf, x).flatten(0, 1), y.flatten()) for x, y in batches]
    assert math.isclose(ckpt["metrics"]["history"][0]["val_loss"], torch.stack(losses).mean().item(), rel_tol=1e-5)
    assert ckpt["metrics"]["history"][-1]["val_loss"] < ckpt["metrics"]["history"][0]["val_loss"]

    result = run_script("pretrained.py", "export", "--ckpt", tmp_path / "out" / "ckpt.pt", "--out", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "export" / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
    model, _, _ = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    ids = torch.randint(100, (1, 17), generator=torch.Generator().manual_seed(5))
    exported = MambaForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(logits(exported, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_init_from_is_read_before_training(hf_dir, tmp_path, capsys):
    ini = tmp_path / "finetune.ini"
    ini.write_text(f"[model]\nscan = ref\n[training]\ninit_from = {hf_dir[0]}\n")
    main.main(["-c", str(ini), "--print-config"])  # the sizes printed are the pretrained model's
    printed = capsys.readouterr().out
    assert "\nd_model = 64\n" in printed and "\nn_layer = 2\n" in printed and "\nscan = ref\n" in printed
    with pytest.raises(SystemExit) as info:
        main.main(["-c", str(ini), "--set", f"training.init_from={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"--set training.init_from={tmp_path / 'nowhere'}: {tmp_path / 'nowhere'}: no such directory" in err


def test_byte_checkpoint_exports_generates_and_fine_tunes(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    data = DataConfig(source=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    train_run(MambaConfig(d_model=32, n_layer=2), data, tiny_train(tmp_path / "a", 2))
    result = run_script("pretrained.py", "export", "--ckpt", tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "export" / "baby_mamba_tokenizer.json").read_text()) == {"kind": "byte"}

    model, _, _ = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    ids = torch.randint(256, (1, 15), generator=torch.Generator().manual_seed(6))
    exported = MambaForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(logits(exported, ids), logits(model, ids), atol=1e-5, rtol=0)

    sample = run_script("generate.py", "--device", "cpu", "--pretrained", tmp_path / "export", "--prompt", "the ",
                        "--max-new-tokens", 12, "--temperature", 0)
    by_ckpt = run_script("generate.py", "--device", "cpu", "--ckpt", tmp_path / "a" / "ckpt.pt", "--prompt", "the ",
                         "--max-new-tokens", 12, "--temperature", 0)
    assert sample.returncode == 0 and sample.stdout == by_ckpt.stdout, sample.stderr

    # [model] is ignored but for scan: the exported config.json gives the architecture (d_model 32, not 1).
    tuned = train_run(MambaConfig(d_model=1, n_layer=1, scan="ref"), data,
                      TrainConfig(**{**vars(tiny_train(tmp_path / "b", 2)), "init_from": str(tmp_path / "export")}))
    first = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["metrics"]["history"][-1]["val_loss"]
    second = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["metrics"]["history"][0]["val_loss"]
    assert math.isclose(first, second, rel_tol=1e-6)  # b started where a ended
    assert tuned["params"] == model.num_params()
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["config"]["model"]["scan"] == "ref"


@pytest.mark.parametrize("model, words", [
    (dict(layer="transformer", n_head=2), "it is the Transformer baseline ([model] layer = transformer)"),
    (dict(gate=False, selective_B=False), "its [model] has selective_B = false, gate = false")])
def test_export_refuses_what_the_published_layouts_cannot_describe(model, words, tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    data = DataConfig(source=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    train_run(MambaConfig(d_model=32, n_layer=2, **model), data, tiny_train(tmp_path / "a", 1))
    result = run_script("pretrained.py", "export", "--ckpt", tmp_path / "a" / "ckpt.pt", "--out", tmp_path / "export")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert not (tmp_path / "export").exists()
