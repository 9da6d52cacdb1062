"""transformer.py, the Transformer baseline: equal to transformers' Llama (the same RoPE + SwiGLU + RMSNorm
recipe) on copied weights, causal, its KV cache continuing exactly what one forward computes (across chunks,
growth and left padding), its parameter count, and a training step that lowers the loss."""
import pytest
import torch
import torch.nn.functional as F

from mamba_config import MambaConfig
from transformer import TransformerLM, rotate

VOCAB = 50


def tiny(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    kwargs = dict(layer="transformer", d_model=32, n_layer=2, n_head=4, expand=3, vocab_size=VOCAB) | overrides
    return TransformerLM(MambaConfig(**kwargs)).eval()


def ids(b, l, seed=1):
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))


def llama_copy(model: TransformerLM):
    """transformers' LlamaForCausalLM of the same shape with our weights copied in (qkv split in three)."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    config = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.d_model, intermediate_size=c.expand * c.d_model,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        rms_norm_eps=c.norm_eps, rope_theta=10000.0, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
        mlp_bias=False, max_position_embeddings=1024)
    llama = transformers.LlamaForCausalLM(config).eval()
    ours = model.state_dict()
    theirs = {"model.embed_tokens.weight": ours["embedding.weight"], "model.norm.weight": ours["norm_f.weight"],
              "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.n_layer):
        mine, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = ours[mine + "attention.qkv.weight"].chunk(3)
        theirs |= {hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k,
                   hf + "self_attn.v_proj.weight": v,
                   hf + "self_attn.o_proj.weight": ours[mine + "attention.out_proj.weight"],
                   hf + "input_layernorm.weight": ours[mine + "norm.weight"],
                   hf + "post_attention_layernorm.weight": ours[mine + "mlp_norm.weight"]}
        theirs |= {hf + f"mlp.{p}.weight": ours[mine + f"mlp.{p}.weight"]
                   for p in ("gate_proj", "up_proj", "down_proj")}
    llama.load_state_dict(theirs, strict=False)  # strict=False: Llama's rotary inv_freq buffer is not a weight
    missing = set(llama.state_dict()) - set(theirs) - {"lm_head.weight"}
    assert not {m for m in missing if "rotary" not in m}
    return llama


@pytest.mark.parametrize("length", [1, 7, 61])
def test_logits_equal_transformers_llama_on_copied_weights(length):
    model = tiny()
    llama = llama_copy(model)
    x = ids(2, length)
    with torch.no_grad():
        ours, theirs = model(x), llama(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_rotary_positions_make_attention_scores_depend_on_the_distance_only():
    q, k = torch.randn(2, 1, 1, 16, dtype=torch.float64)
    at = [(rotate(q, torch.tensor([i])) * rotate(k, torch.tensor([j]))).sum().item() for i, j in
          [(5, 2), (13, 10), (103, 100)]]
    # the angles are float32 (as Llama's), which rounds position 103's to about 1e-7
    assert at[0] == pytest.approx(at[1], rel=1e-6) and at[0] == pytest.approx(at[2], rel=1e-6)
    assert (rotate(q, torch.tensor([0])) == q).all()  # position 0 is no rotation


def test_a_token_changes_no_logit_before_it():
    model, x = tiny(), ids(1, 20)
    changed = x.clone()
    changed[0, 12] = (x[0, 12] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().amax(-1).min() > 1e-4  # and every logit from it on


@pytest.mark.parametrize("pieces", [[1] * 9, [4, 1, 1, 3], [9]])
def test_prefill_and_steps_continue_what_one_forward_computes(pieces):
    model, x = tiny(), ids(2, 9)
    with torch.no_grad():
        full = model(x)
    cache, start, last = model.allocate_cache(2), 0, []
    for n in pieces:  # a cache that starts empty and grows (capacity 1, 2, 4, ...) as the pieces arrive
        last.append(model.prefill(x[:, start:start + n], cache, chunk_size=3) if n > 1 else
                    model.step(x[:, start], cache))
        start += n
    positions = [sum(pieces[:i + 1]) - 1 for i in range(len(pieces))]
    for logits, p in zip(last, positions):
        torch.testing.assert_close(logits, full[:, p], rtol=1e-5, atol=1e-5)
    assert all(int(layer[3]) == 9 for layer in cache)


def test_left_padded_rows_equal_their_prompts_alone():
    model = tiny()
    short, long = ids(1, 4, seed=2), ids(1, 9, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    together = model.generate(batch, 6, temperature=0, attention_mask=mask)
    alone = [model.generate(p, 6, temperature=0) for p in (short, long)]
    assert torch.equal(together[0, 5:], alone[0][0]) and torch.equal(together[1], alone[1][0])
    cache = model.allocate_cache(2)
    last = model.prefill(batch, cache, attention_mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(last[0], model(short)[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
def test_parameter_count_is_the_formula(tie, bias):
    d, n_layer, d_ff, v = 32, 3, 96, 56  # vocabulary 50 padded to a multiple of 8
    block = 4 * d * d + 3 * d * d_ff + 2 * d + (3 * d + d + 2 * d_ff + d) * bias   # attention, MLP, two norm gains
    model = tiny(n_layer=n_layer, tie_embeddings=tie, bias=bias)
    assert model.num_params() == v * d * (1 + (not tie)) + n_layer * block + d


def test_a_few_adam_steps_lower_the_loss_and_decay_only_the_block_matrices():
    model, x = tiny().train(), ids(4, 33)
    decayed, others = model.optim_groups(0.1)
    assert {p.dim() for p in decayed["params"]} == {2} and len(decayed["params"]) == 2 * 5
    assert model.embedding.weight in others["params"]
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_heads_that_do_not_split_d_model_evenly_are_refused_by_name():
    with pytest.raises(ValueError, match="MambaConfig.n_head must be a divisor of d_model = 32"):
        MambaConfig(layer="transformer", d_model=32, n_head=3)
    with pytest.raises(ValueError, match="even number of channels"):
        MambaConfig(layer="transformer", d_model=36, n_head=12)  # heads of 3 channels: RoPE turns pairs
