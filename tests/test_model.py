"""Tests of model.py: causality, recurrent decoding (prefill continuing the cache), agreement with transformers'
independent Mamba, initialisation statistics and layout, optimiser groups and the selectivity switches.
MambaConfig and param_count: test_mamba_config.py."""
import importlib.util
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_config import MambaConfig, param_count
from model import MambaLM
from models import VOCAB, random_ids, small_model
from selective_scan import selective_scan_ref

# ---- causality and recurrent decoding ------------------------------------------------------------------------

@pytest.mark.parametrize("scan", ["fast", "ref"])
def test_causal(scan):
    model, t = small_model(scan=scan), 9
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(50)  # std 1, not 0.02: larger logits, differences far above rounding
    ids = random_ids(2, 20)
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert (before[:, t:] - after[:, t:]).abs().amax(dim=-1).min() > 1e-5  # every later one is affected


def test_fast_and_ref_scans_give_the_same_logits():
    ids = random_ids(2, 37)
    with torch.no_grad():
        fast, ref = small_model(scan="fast")(ids), small_model(scan="ref")(ids)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_len", [1, 3, 50])
def test_prefill_then_steps_reproduce_forward(prompt_len):
    """Prompts shorter than d_conv = 4 included: the conv window is then left-padded with zeros."""
    model, ids = small_model(), random_ids(2, prompt_len + 8)
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_cache(2)
    logits = [model.prefill(ids[:, :prompt_len], cache)]
    logits += [model.step(ids[:, t], cache) for t in range(prompt_len, ids.shape[1])]
    torch.testing.assert_close(torch.stack(logits, dim=1), full[:, prompt_len - 1:], rtol=0, atol=1e-4)


def test_steps_from_an_empty_cache_reproduce_forward():
    """The equivalent of a prefill of length 0: every token goes through step()."""
    model, ids = small_model(), random_ids(3, 12)
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_cache(3)
    stepped = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        model.prefill(ids[:, :0], cache)


@pytest.mark.parametrize("chunks", [[1, 9], [3, 4, 3], [2, 8], [10]], ids=["1+9", "3+4+3", "2+8", "10"])
def test_prefill_in_pieces_continues_the_cache(chunks):
    """Full forward == prefill in pieces (the first shorter than d_conv = 4 included) == steps: the conv window
    and the state carry over from one piece to the next."""
    model, ids = small_model(), random_ids(2, sum(chunks))
    with torch.no_grad():
        full = model(ids)
    cache, start = model.allocate_cache(2), 0
    for n in chunks:
        last = model.prefill(ids[:, start:start + n], cache)
        torch.testing.assert_close(last, full[:, start + n - 1], rtol=0, atol=1e-4)
        start += n
    stepped = model.allocate_cache(2)
    for t in range(ids.shape[1]):
        model.step(ids[:, t], stepped)
    for (conv_a, ssm_a), (conv_b, ssm_b) in zip(cache, stepped):
        torch.testing.assert_close(conv_a, conv_b, rtol=0, atol=1e-5)
        torch.testing.assert_close(ssm_a, ssm_b, rtol=0, atol=1e-4)


def test_forward_with_a_cache_gives_every_logit_of_a_continued_sequence():
    model, ids = small_model(), random_ids(3, 30)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(3)
        model(ids[:, :11], cache=cache)
        torch.testing.assert_close(model(ids[:, 11:], cache=cache), full[:, 11:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"gate": False}, {"dtype": torch.bfloat16}, {"dtype": torch.float64}],
                         ids=["official", "no-gate", "bf16", "f64"])
def test_the_written_out_step_is_step_reference(overrides):
    """MambaMixer.step (the recurrence written out for the official block) against step_reference (through
    ssm_params and selective_state_update): the same outputs and states, token after token."""
    dtype = overrides.pop("dtype", torch.float32)
    mixer = small_model(**overrides).to(dtype).backbone.layers[0].mixer
    hidden = torch.randn(2, 9, mixer.in_proj.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    states = [[torch.zeros(2, mixer.d_inner, mixer.d_conv, dtype=dtype),
               torch.zeros(2, mixer.d_inner, mixer.d_state, dtype=torch.promote_types(dtype, torch.float32))]
              for _ in range(2)]
    with torch.inference_mode():
        for t in range(9):
            fast = mixer.step(hidden[:, t], *states[0])
            torch.testing.assert_close(fast, mixer.step_reference(hidden[:, t], *states[1]))
            assert fast.dtype == dtype
    for a, b in zip(*states):
        torch.testing.assert_close(a, b)


def test_decoding_follows_every_in_place_change_of_A_log():
    """A log2(e) is kept between decoding steps (MambaMixer._A_log2e): an optimizer step, load_state_dict and a
    move to another dtype must each reach the next step, which must then equal a forward of the changed model."""
    model, ids = small_model(), random_ids(2, 6)

    def step_equals_forward():  # the forward of a fresh copy, which has kept nothing
        cache = model.allocate_cache(2)
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
        fresh = MambaLM(model.config).to(model.lm_head.weight.dtype)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(stepped, fresh(ids), rtol=0, atol=1e-4)

    step_equals_forward()
    A_log = model.backbone.layers[0].mixer.A_log
    optimizer = torch.optim.SGD([A_log], lr=1.0)
    A_log.grad = torch.full_like(A_log, -1.0)  # A_log += 1: every decay rate e times larger
    optimizer.step()
    step_equals_forward()
    model.load_state_dict(small_model(seed=1).state_dict())
    step_equals_forward()
    model.double()
    step_equals_forward()
    with torch.inference_mode():  # a model made here has tensors without version counters
        model = small_model()
    step_equals_forward()


@pytest.mark.parametrize("layer", ["mamba1", "mamba2"])
def test_the_compiled_step_decodes_as_the_eager_one(layer):
    """compile_step: the compiled graph gives the eager step's logits and leaves the same cache, token after token
    after a left-padded prefill, and it follows new weights (parameters are inputs of the graph, not constants)."""
    from torch._dynamo.utils import counters  # how many graphs torch.compile has made in this process
    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = small_model(layer=layer), small_model(layer=layer).compile_step()
    ids, mask = random_ids(2, 12), torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    caches = [model.allocate_cache(2) for model in (eager, compiled)]
    for model, cache in zip((eager, compiled), caches):
        model.prefill(ids[:, :5], cache, mask)

    def same_steps(tokens):
        for token in tokens.unbind(1):
            torch.testing.assert_close(compiled.step(token, caches[1]), eager.step(token, caches[0]),
                                       rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(*caches):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    same_steps(ids[:, 5:9])
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the steps went through one compiled graph
    changed = small_model(seed=1, layer=layer).state_dict()
    eager.load_state_dict(changed)
    compiled.load_state_dict(changed)
    same_steps(ids[:, 9:])


def test_a_long_prompt_is_read_in_chunks_of_bounded_size(monkeypatch):
    """prefill cuts the prompt into PREFILL_CHUNK-token pieces (made 16 here): the same logits as one pass."""
    import model as model_module
    model, ids = small_model(), random_ids(2, 100)
    with torch.no_grad():
        full = model(ids)
    seen = []
    forward = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda x, *a: seen.append(x.shape[1]) or forward(x, *a))
    last = model.prefill(ids, model.allocate_cache(2), chunk_size=16)
    assert seen == [16] * 6 + [4]
    torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-4)
    assert model_module.PREFILL_CHUNK >= 1024


def test_bfloat16_model_decodes_like_its_forward():
    model, ids = small_model().to(torch.bfloat16), random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).float()
    cache = model.allocate_cache(2)
    assert cache[0][1].dtype == torch.float32  # the SSM state accumulates over tokens: kept in float32
    logits = [model.prefill(ids[:, :4], cache)] + [model.step(ids[:, t], cache) for t in range(4, 10)]
    stepped = torch.stack(logits, dim=1).float()
    assert torch.isfinite(stepped).all()
    torch.testing.assert_close(stepped, full[:, 3:], rtol=0, atol=0.05)


def test_backward_reaches_every_parameter():
    model, ids = small_model().train(), random_ids(2, 16)
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_logits_match_transformers_mamba():
    """transformers' MambaForCausalLM is an independent implementation; on CPU without mamba_ssm it runs its
    pure-PyTorch sequential path. Its random weights are perturbed (A_log, D, norms, conv and dt biases...) so
    that no parameter keeps a trivial init value that could hide a mistake."""
    import transformers  # a test requirement, imported here because it takes seconds

    assert importlib.util.find_spec("mamba_ssm") is None, "transformers must use its slow pure-torch path here"
    torch.manual_seed(0)
    hf_config = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100, state_size=16,
                                         expand=2, conv_kernel=4, layer_norm_epsilon=1e-5, use_mambapy=False)
    hf = transformers.MambaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    # vocab 100 is already a multiple of 4, so no padding row is added and the shapes match.
    ours = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=100, d_state=16, pad_vocab_size_multiple=4)).eval()
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state)
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        expected, got = hf(ids, use_cache=False).logits, ours(ids)
    assert expected.abs().max() > 1  # not a degenerate comparison
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


# ---- initialisation -----------------------------------------------------------------------------------------

def test_initialisation_statistics():
    config = MambaConfig(d_model=256, n_layer=4, vocab_size=100, d_state=16)
    torch.manual_seed(0)
    model = MambaLM(config)
    fresh_linear_std = nn.Linear(config.d_inner, config.d_model).weight.std()
    for layer in model.backbone.layers:
        m = layer.mixer
        dt = F.softplus(m.dt_proj.bias)
        assert dt.min() >= config.dt_min * (1 - 1e-4) and dt.max() <= config.dt_max * (1 + 1e-4)
        # log-uniform: log dt is uniform on [log dt_min, log dt_max], mean in the middle (sd of the mean 0.06)
        assert abs(dt.log().mean() - (math.log(config.dt_min) + math.log(config.dt_max)) / 2) < 0.3
        bound = config.dt_rank_value ** -0.5 * config.dt_scale
        assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > 0.9 * bound
        assert m.A_log.dtype == torch.float32
        torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, 17.0).expand(config.d_inner, -1))
        assert torch.equal(m.D, torch.ones(config.d_inner)) and torch.equal(layer.norm.weight, torch.ones(256))
        expected_std = fresh_linear_std / math.sqrt(config.n_layer)
        assert abs(m.out_proj.weight.std() / expected_std - 1) < 0.05
    assert abs(model.backbone.embedding.weight.std() - 0.02) < 0.001
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_dt_init_floor_and_zero_linear_biases():
    torch.manual_seed(0)
    config = MambaConfig(d_model=64, n_layer=1, vocab_size=10, dt_min=1e-5, dt_max=1e-2, dt_init_floor=1e-3,
                         bias=True)
    mixer = MambaLM(config).backbone.layers[0].mixer
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and (dt < 1.001e-3).any()  # clamped values sit at the floor
    assert not mixer.in_proj.bias.any() and not mixer.out_proj.bias.any()


def test_the_big_projections_keep_their_layout_and_official_shapes():
    """in_proj and out_proj are stored one row per input (decoding's matrix-vector products run faster so); the
    shapes and values are nn.Linear's, the layout survives load_state_dict and a cast, and the products equal
    those of a contiguous copy of the same weight."""
    model, fresh = small_model(seed=0), small_model(seed=1)
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    for m in (model, fresh, fresh.double()):
        for linear in (m.backbone.layers[0].mixer.in_proj, m.backbone.layers[0].mixer.out_proj):
            assert linear.weight.shape == (linear.out_features, linear.in_features)
            assert linear.weight.t().is_contiguous()
    mixer = model.backbone.layers[0].mixer
    x = torch.randn(3, mixer.in_proj.in_features)
    torch.testing.assert_close(mixer.in_proj(x), x @ mixer.in_proj.weight.contiguous().t())

# ---- optimiser groups -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_optim_groups_cover_every_parameter_once(tie):
    model = small_model(tie_embeddings=tie, bias=True)
    decay, no_decay = model.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in model.parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)].split("mixer.")[-1] for p in decay["params"]}
    assert decayed == {"in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"}
    assert len(decay["params"]) == 4 * model.config.n_layer
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    for name in ("A_log", "D", "norm.weight", "norm_f.weight", "in_proj.bias", "dt_proj.bias", "conv1d.bias",
                 "embedding.weight"):
        assert any(n.endswith(name) for n in not_decayed), name
    torch.optim.AdamW(model.optim_groups(0.1), lr=1e-3)  # accepted as is


# ---- selectivity switches (ablations) ---------------------------------------------------------------------------

ABLATIONS = {
    "lti": dict(selective_delta=False, selective_B=False, selective_C=False),
    "fixed-delta": dict(selective_delta=False),
    "fixed-B": dict(selective_B=False),
    "fixed-C": dict(selective_C=False),
    "selective-A": dict(selective_A=True),
    "no-gate": dict(gate=False),
    "no-gate-lti": dict(gate=False, selective_delta=False, selective_B=False, selective_C=False),
    "A-instead-of-delta": dict(selective_A=True, selective_delta=False),
}


def perturbed(model):
    """Nudge every parameter, so that no switch's parameter keeps a trivial init value that could hide a mistake."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablations_decode_count_and_train_like_the_full_model(name):
    model = perturbed(small_model(**ABLATIONS[name]))
    ids = random_ids(2, 30)
    with torch.no_grad():
        full, ref = model(ids), perturbed(small_model(scan="ref", **ABLATIONS[name]))(ids)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)  # fast scan == reference loop
    cache = model.allocate_cache(2)
    steps = [model.prefill(ids[:, :5], cache)] + [model.step(ids[:, t], cache) for t in range(5, 30)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-4, atol=1e-5)
    assert model.num_params() == param_count(model.config)
    model.train()
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_switches_add_and_remove_the_right_parameters():
    def names(**kw):
        return {n.split("mixer.")[-1] for n, _ in small_model(**kw).named_parameters() if "layers.0.mixer" in n}
    full = names()
    assert full == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                    "dt_proj.bias", "A_log", "D", "out_proj.weight"}           # the official names, nothing else
    lti = full - {"x_proj.weight", "dt_proj.weight", "dt_proj.bias"} | {"dt_bias", "B", "C"}
    assert names(**ABLATIONS["lti"]) == lti
    assert names(selective_A=True) == full | {"A_proj.weight", "A_proj.bias"}
    mixer = small_model(selective_A=True, selective_B=False).backbone.layers[0].mixer
    assert mixer.x_proj.out_features == 2 * mixer.dt_rank + mixer.d_state  # dt, C, a: B is not projected
    torch.testing.assert_close(F.softplus(mixer.A_proj.bias), torch.ones(mixer.d_inner))  # A_t = A at the bias
    model = small_model(**ABLATIONS["lti"], selective_A=True)
    named = {id(p): n.split("mixer.")[-1] for n, p in model.named_parameters()}
    decay, no_decay = model.optim_groups(0.1)
    assert {named[id(p)] for p in decay["params"]} == {"in_proj.weight", "x_proj.weight", "A_proj.weight",
                                                       "out_proj.weight"}
    assert {"B", "C", "dt_bias", "A_proj.bias"} <= {named[id(p)] for p in no_decay["params"]}


def test_without_the_gate_the_block_is_out_proj_of_the_ssm_alone():
    """gate = false (Table 1's "no gate"): in_proj makes x only, and the block's output is out_proj(y) with y the
    scan of the conv branch, no silu(z) factor; checked against the reference scan called here."""
    mixer = perturbed(small_model(gate=False)).backbone.layers[0].mixer
    assert mixer.in_proj.out_features == mixer.d_inner
    hidden = torch.randn(2, 11, 32)
    with torch.no_grad():
        x = mixer.in_proj(hidden).transpose(1, 2)
        u = F.silu(mixer.conv1d(x)[..., :11])
        p = mixer.ssm_params(u)
        y = selective_scan_ref(u, p["dt"], p["A"], p["B"], p["C"], mixer.D, delta_bias=p["dt_bias"],
                               delta_softplus=True)
        torch.testing.assert_close(mixer(hidden), mixer.out_proj(y.transpose(1, 2)), rtol=1e-5, atol=1e-6)


def test_time_invariant_mixer_is_the_s4_convolution():
    """All switches off, the SSM is linear time-invariant, so it equals a causal convolution of u with the kernel
    K_k = Σ_n C_n exp(Δ A_n)^k Δ B_n per channel (S4's convolutional view, computed here independently)."""
    torch.manual_seed(0)
    mixer = perturbed(small_model(**ABLATIONS["lti"])).backbone.layers[0].mixer.double()
    hidden = torch.randn(2, 40, 32, dtype=torch.float64)
    with torch.no_grad():
        x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        u = F.silu(mixer.conv1d(x)[..., :40])                                     # (b, d, l)
        delta = F.softplus(mixer.dt_bias)[:, None]                                # (d, 1)
        A = -torch.exp(mixer.A_log)                                               # (d, n)
        k = torch.arange(40, dtype=torch.float64)
        kernel = (mixer.C[:, :, None] * torch.exp(delta[..., None] * A[:, :, None] * k) * delta[..., None]
                  * mixer.B[:, :, None]).sum(1)                                   # (d, l)
        y = F.conv1d(F.pad(u, (39, 0)), kernel.flip(-1)[:, None], groups=u.shape[1]) + mixer.D[:, None] * u
        expected = mixer.out_proj((y * F.silu(z)).transpose(1, 2))
        torch.testing.assert_close(mixer(hidden), expected, rtol=1e-10, atol=1e-12)
