"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) equal a plain full forward's
log-softmax for every prompt token, whatever the batch, chunking, cache or architecture; a
request for them never takes a prefix-cache hit but leaves its blocks for later requests;
``max_tokens=0`` scores without generating; the decode path is unchanged."""
import pytest
import torch

from eval.mmlu import letter_logprobs
from eval.scoring import continuation_logprobs
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from tests.inference.test_engine import ALL, make_prompts, one_thread, tiny_model  # noqa: F401  (an autouse fixture)
from utils.errors import UserError

ARCHS = ["llama3", "gemma2", "deepseek_v3", "linear_attention"]  # plain GQA, logit softcap, MLA cache, recurrent state


@torch.no_grad()
def reference(model, prompt: list[int], top_n: int) -> tuple[list[float], list[list[int]]]:
    """log p(prompt[t] | prompt[:t]) for t >= 1 and the top_n ids at each position, from one full forward."""
    logp = model(torch.tensor([prompt]))[0].float().log_softmax(-1)  # (T, V)
    chosen = logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    return chosen.tolist(), logp[:-1].topk(top_n, -1).indices.tolist()


def check(model, prompt: list[int], entries, top_n: int) -> None:
    assert len(entries) == len(prompt) and [e.token_id for e in entries] == prompt
    assert entries[0].logprob is None and entries[0].top == []
    want, want_top = reference(model, prompt, top_n)
    got = torch.tensor([e.logprob for e in entries[1:]])
    assert torch.allclose(got, torch.tensor(want), atol=1e-4, rtol=0), (got - torch.tensor(want)).abs().max()
    for e, ids in zip(entries[1:], want_top):
        assert len(e.top) == top_n
        assert [t for t, _ in e.top][:1] == ids[:1]  # the most likely token (lower ranks may tie)
        assert e.top[0][1] >= e.logprob - 1e-6


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("budget", [2048, 7])  # one prefill, or chunked prefill over several steps
def test_prompt_logprobs_equal_a_full_forward(name, budget):
    model = tiny_model(ALL[name])
    engine = LLMEngine(model, block_size=4, max_num_batched_tokens=budget)
    prompts = make_prompts(model.cfg.vocab_size) + [[5]]  # a one-token prompt has only its null entry
    outs = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    for prompt, out in zip(prompts, outs):
        check(model, prompt, out.prompt_logprobs, 2)
    assert engine.bm.num_free_blocks == engine.num_blocks


def test_same_numbers_as_eval_scoring():
    """The engine's prompt logprobs are the continuation log-probabilities eval/ computes
    (eval/scoring.py's batched forward, eval/mmlu.py's letter scoring) for the same tokens."""
    model = tiny_model(ALL["llama3"])
    engine = LLMEngine(model, block_size=4)
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, 128, (30,), generator=g).tolist()
    letters = [[7], [8], [9], [10]]
    outs = engine.generate([context + x for x in letters], SamplingParams(max_tokens=0, prompt_logprobs=0))
    got = torch.tensor([out.prompt_logprobs[-1].logprob for out in outs])
    assert torch.allclose(got, letter_logprobs(model, [context], letters)[0], atol=1e-4, rtol=0)
    two_token = continuation_logprobs(model, [context], [[7, 8]])[0]
    out = engine.generate([context + [7, 8]], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert abs(out.prompt_logprobs[-2].logprob + out.prompt_logprobs[-1].logprob - two_token.item()) <= 1e-4


def test_scored_requests_skip_the_prefix_cache_but_fill_it():
    model = tiny_model(ALL["llama3"])
    engine = LLMEngine(model, block_size=4)
    shared = list(range(20, 44))  # six full blocks
    engine.generate([shared + [1, 2]], SamplingParams(max_tokens=2, temperature=0.0))  # warms the cache
    engine.generate([shared + [1, 3]], SamplingParams(max_tokens=1, temperature=0.0))
    hits = engine.bm.prefix_hit_tokens
    assert hits == 24, "the cache is warm"
    scored = engine.generate([shared + [3, 4]], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert engine.bm.prefix_hit_tokens == hits, "a scored prompt must compute every position"
    check(model, shared + [3, 4], scored.prompt_logprobs, 1)
    engine.bm.reset_prefix_cache()
    engine.generate([shared + [5, 6]], SamplingParams(max_tokens=0, prompt_logprobs=0))
    plain = engine.generate([shared + [7, 8]], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert engine.bm.prefix_hit_tokens == hits + 24, "the scored request's blocks serve later requests"
    assert plain.outputs[0].token_ids == engine.generate([shared + [7, 8]], SamplingParams(max_tokens=2, temperature=0.0))[0].outputs[0].token_ids


def test_max_tokens_zero_generates_nothing_and_frees_blocks():
    model = tiny_model(ALL["llama3"])
    engine = LLMEngine(model, block_size=4, max_model_len=64)
    full = list(range(1, 65))  # the prompt may fill the context when nothing is generated
    out = engine.generate([full], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == 64
    plain = engine.generate([full[:10]], SamplingParams(max_tokens=0))[0]
    assert plain.outputs[0].token_ids == [] and plain.prompt_logprobs is None
    assert engine.bm.num_free_blocks == engine.num_blocks and not engine.has_unfinished()
    with pytest.raises(UserError, match="n=1"):
        engine.generate([full[:10]], SamplingParams(max_tokens=0, n=2))


def test_generation_is_unchanged_and_siblings_share_the_prompt_scores():
    model = tiny_model(ALL["llama3"])
    prompts = make_prompts(128)
    plain = LLMEngine(model, block_size=4).generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))
    scored = LLMEngine(model, block_size=4).generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True,
                                                                             prompt_logprobs=0))
    for a, b in zip(plain, scored):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [e.logprob for e in a.outputs[0].logprobs] == [e.logprob for e in b.outputs[0].logprobs]
        assert a.prompt_logprobs is None and len(b.prompt_logprobs) == len(b.prompt_ids)
    engine = LLMEngine(model, block_size=4)
    rid = engine.add_request(prompts[3], SamplingParams(max_tokens=4, temperature=1.0, seed=1, n=3, prompt_logprobs=0))
    firsts = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id == rid and out.index not in firsts
                firsts[out.index] = [e.logprob for e in out.prompt_logprobs]
    assert sorted(firsts) == [0, 1, 2] and firsts[0] == firsts[1] == firsts[2]
