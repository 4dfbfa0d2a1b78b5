"""Incremental decoding with the KV cache equals full recompute."""
import pytest
import torch

from model import KVCache, Transformer
from tests.model.test_hf_parity import CONFIGS, randomize


def greedy_full(model, prompt, n):
    idx = prompt
    for _ in range(n):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
    return idx[:, prompt.shape[1]:]


def is_greedy_under_recompute(model, prompt, tokens) -> bool:
    """True iff every token is the argmax of a full no-cache forward over everything before it.

    A causal model's logits at position t depend only on tokens <= t, so one forward over
    prompt + tokens gives every step of greedy_full at once (same check, 1 forward not n).
    """
    P = prompt.shape[1]
    logits = model(torch.cat([prompt, tokens], 1))
    return torch.equal(logits[:, P - 1 : -1].argmax(-1), tokens)


def greedy_cached(model, prompt, n):
    cache = KVCache(prompt.shape[1] + n)
    logits = model(prompt, cache=cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_cache_equals_recompute(name):
    torch.manual_seed(1)
    model = Transformer(CONFIGS[name]).eval()
    randomize(model)
    prompt = torch.randint(0, CONFIGS[name].vocab_size, (2, 5))
    with torch.no_grad():
        assert is_greedy_under_recompute(model, prompt, greedy_cached(model, prompt, 32))


def test_recompute_check_equals_step_by_step_greedy():
    torch.manual_seed(1)
    model = Transformer(CONFIGS["llama3"]).eval()
    randomize(model)
    prompt = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        tokens = greedy_full(model, prompt, 8)
        assert torch.equal(tokens, greedy_cached(model, prompt, 8))
        assert is_greedy_under_recompute(model, prompt, tokens)
        tokens[1, 3] = (tokens[1, 3] + 1) % 128
        assert not is_greedy_under_recompute(model, prompt, tokens)


@pytest.mark.parametrize("name", ["llama3", "mistral", "gpt2"])
def test_prefill_plus_steps_logits_equal_full(name):
    torch.manual_seed(2)
    model = Transformer(CONFIGS[name]).eval()
    idx = torch.randint(0, CONFIGS[name].vocab_size, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(24)
        parts = [model(idx[:, :10], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(10, 24)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
