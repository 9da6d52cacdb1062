"""sampling.py: greedy generation equals the argmax of the full forward, sampling is seeded and keeps the right
support, a stream continues exactly from its cache, and prompts of different lengths share a batch by left
padding, each row continuing as its prompt does alone."""
import pytest
import torch

from models import VOCAB, random_ids, small_model
from sampling import check_left_padding, sample_next_token


def greedy_by_full_forward(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            next_id = model(ids)[:, -1, :VOCAB].argmax(dim=-1)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
    return ids


def test_greedy_generation_equals_argmax_of_full_forward():
    model, prompt = small_model(seed=3), random_ids(2, 5)
    out = model.generate(prompt, 12, temperature=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_by_full_forward(model, prompt, 12))


def test_sampling_is_reproducible_and_top_k_1_or_tiny_top_p_is_greedy():
    model, prompt = small_model(seed=3), random_ids(2, 5)
    greedy = model.generate(prompt, 10, temperature=0)

    def sample(seed, **kw):
        return model.generate(prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7, top_k=1), greedy)
    assert torch.equal(sample(7, top_p=1e-9), greedy)
    assert torch.equal(model.generate(prompt, 0), prompt)
    streamed = list(model.stream(prompt, 4, temperature=0))
    assert len(streamed) == 4 and torch.equal(torch.stack(streamed, dim=1), greedy[:, 5:9])


def test_padding_ids_are_never_generated():
    model = small_model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 100.0  # the padding rows would win every argmax if they were allowed
    prompt = random_ids(4, 3)
    assert model.generate(prompt, 8, temperature=0).max() < VOCAB
    assert model.generate(prompt, 8, temperature=3.0, generator=torch.Generator().manual_seed(0)).max() < VOCAB


def test_top_k_and_top_p_keep_the_right_support():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits, g = probs.log().expand(4000, -1), torch.Generator().manual_seed(0)
    counts = lambda ids: torch.bincount(ids, minlength=5)  # noqa: E731
    assert set(counts(sample_next_token(logits, top_k=2, generator=g)).nonzero().flatten().tolist()) == {1, 3}
    # Nucleus: 0.4 + 0.3 = 0.7 < 0.75, so the third most likely (index 4, 0.15) is needed too.
    by_top_p = counts(sample_next_token(logits, top_p=0.75, generator=g))
    assert set(by_top_p.nonzero().flatten().tolist()) == {1, 3, 4}
    torch.testing.assert_close(by_top_p[[1, 3, 4]] / 4000, torch.tensor([0.4, 0.3, 0.15]) / 0.85, atol=0.03, rtol=0)
    plain = counts(sample_next_token(logits, generator=g)) / 4000
    torch.testing.assert_close(plain, probs[0], atol=0.03, rtol=0)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_next_token(logits, **bad)


def test_a_stream_continues_exactly_from_its_cache():
    """stream(prompt, 7) then stream(last token, 5) on the same cache: the tokens of stream(prompt, 12), sampled
    ones too when the generator goes on (prefill of the one last token is the step it would have been)."""
    model, prompt = small_model(seed=4), random_ids(2, 6)
    for temperature in (0.0, 1.2):
        whole = list(model.stream(prompt, 12, temperature, generator=torch.Generator().manual_seed(9)))
        generator, cache = torch.Generator().manual_seed(9), model.allocate_cache(2)
        first = list(model.stream(prompt, 7, temperature, generator=generator, cache=cache))
        rest = list(model.stream(first[-1][:, None], 5, temperature, generator=generator, cache=cache))
        assert torch.equal(torch.stack(first + rest), torch.stack(whole)), temperature


def left_pad(prompts, pad_id=7):
    """Prompts of different lengths as one (b, l) batch with left padding, and its attention_mask."""
    l = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (l - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (l - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("conv_bias", [True, False])
def test_a_left_padded_batch_continues_every_prompt_as_alone(conv_bias):
    """Padding never enters the state or the conv window (with a conv bias, silu(bias) is not zero on padded
    steps, the trap transformers fell into): each row's greedy continuation equals its prompt generated alone,
    and its logits equal the unpadded ones, whatever token the padding holds."""
    model = small_model(seed=5, conv_bias=conv_bias)
    with torch.no_grad():
        for layer in model.backbone.layers:  # mixers loud enough that padding leaking in would change the tokens
            layer.mixer.in_proj.weight.mul_(3)
            layer.mixer.out_proj.weight.mul_(3)
            if conv_bias:
                layer.mixer.conv1d.bias.normal_(0, 2)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (1, 3, 9, 20)]
    for pad_id in (0, 7):
        ids, mask = left_pad(prompts, pad_id)
        batched = model.generate(ids, 10, temperature=0, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), 10, temperature=0)
            assert batched[row, -10:].tolist() == alone[0, -10:].tolist(), (row, pad_id)
        for row, prompt in enumerate(prompts):
            cache = model.allocate_cache(1)
            alone = model.prefill(torch.tensor([prompt]), cache)
            torch.testing.assert_close(model.prefill(ids, model.allocate_cache(4), mask)[row], alone[0],
                                       rtol=0, atol=1e-4)


def test_padding_longer_than_a_prefill_chunk():
    """A row that is all padding for a whole chunk keeps a zero state through it."""
    model = small_model(seed=6)
    prompts = [random_ids(1, 40, seed=1)[0].tolist(), random_ids(1, 3, seed=2)[0].tolist()]
    ids, mask = left_pad(prompts)
    chunked = model.prefill(ids, model.allocate_cache(2), mask, chunk_size=8)
    for row, prompt in enumerate(prompts):
        alone = model.prefill(torch.tensor([prompt]), model.allocate_cache(1))
        torch.testing.assert_close(chunked[row], alone[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("mask, words", [
    ([[1, 1, 0]], "left padding"), ([[0, 1, 0]], "left padding"), ([[0, 0, 0]], "left padding"),
    ([[1, 2, 1]], "left padding"), ([[1, 1]], "the shape of input_ids (1, 3)")])
def test_a_mask_that_is_not_left_padding_is_refused(mask, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_left_padding(torch.tensor(mask), torch.zeros(1, 3, dtype=torch.long))
    model = small_model()
    with pytest.raises(ValueError, match="attention_mask"):
        model.prefill(torch.zeros(1, 3, dtype=torch.long), model.allocate_cache(1), torch.tensor(mask))
