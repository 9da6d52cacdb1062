"""Sampling from a causal language model that reads text through a recurrent state (or any cache).

``Generation`` gives a model ``stream`` and ``generate`` from three methods of its own:
``allocate_cache(batch_size)``, ``prefill(input_ids, cache, attention_mask)`` (read tokens, continuing from
what the cache holds; the last token's logits) and ``step(token_ids, cache)`` (one token). MambaLM has them;
so can any other model with a cache. Prompts of different lengths share a batch by left padding, with
transformers' convention: ``attention_mask`` (b, l) is 1 on tokens and 0 on the padding before them.
"""
import torch


def check_sampling(temperature, top_k, top_p):
    """A ValueError naming the first sampling setting that is impossible (top_k and top_p may be None)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_left_padding(attention_mask, input_ids):
    """A ValueError unless attention_mask (b, l) is left padding for input_ids (b, l): each row some 0s, then
    1s, and at least one 1 (a row without a token has nothing to continue)."""
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.long()
    if not ((mask == 0) | (mask == 1)).all() or (mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding: in every row 0s (padding) and then 1s (tokens), "
                         "ending with a token")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (b, v) -> token ids (b,). temperature 0 is greedy (argmax); top_k keeps the k most likely ids;
    top_p keeps the smallest set of most likely ids whose probability reaches top_p (nucleus sampling)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an id once the more likely ones already reach top_p; the most likely id is always kept.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class Generation:
    """stream and generate for a model with allocate_cache, prefill and step (and config.vocab_size, the ids
    that can be sampled: the embedding's padding rows never are)."""

    @torch.inference_mode()
    def stream(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
               attention_mask=None, cache=None):
        """Yields max_new_tokens next-token ids (b,), one at a time, continuing input_ids (b, l), l >= 1, from
        ``cache`` (a fresh one when None). Afterwards the cache has read input_ids and every yielded token but
        the last: stream(last[:, None], n, cache=cache) continues exactly where this stopped."""
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens <= 0:
            return
        cache = self.allocate_cache(input_ids.shape[0], device=input_ids.device) if cache is None else cache
        logits = self.prefill(input_ids, cache, attention_mask)
        for i in range(max_new_tokens):
            token = sample_next_token(logits[:, :self.config.vocab_size], temperature, top_k, top_p, generator)
            yield token
            if i + 1 < max_new_tokens:
                logits = self.step(token, cache)

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 attention_mask=None):
        """input_ids (b, l) -> (b, l + max_new_tokens): the prompt followed by the tokens of stream()."""
        new = self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, generator, attention_mask)
        return torch.cat([input_ids, *(token[:, None] for token in new)], dim=1)
