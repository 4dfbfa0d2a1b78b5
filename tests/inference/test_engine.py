"""The engine's greedy output equals a plain full-recompute loop, token for token, for every
architecture: alone, in a batch of mixed lengths, with prefix caching on and off, with chunked
prefill and under forced preemption; afterwards every block is free again."""
import pytest
import torch

from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from model import ModelConfig, Transformer
from tests.model.test_hf_parity import CONFIGS, randomize

EXTRA = {  # zoo parts not covered by the HF parity configs
    "alibi": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, pos_emb="alibi"),
    "gqa_window_pattern": ModelConfig(
        vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, sliding_window=5, sliding_window_pattern=3
    ),
    "linear_attention": ModelConfig(
        vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, attention="linear", pos_emb="rope"
    ),
}
ALL = {**CONFIGS, **EXTRA}
N_NEW = 10


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: intra-op threads only add contention for these tiny matmuls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomize(model)
    return model


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """The plain loop: recompute the whole sequence for every new token."""
    idx = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
    return idx[0, len(prompt) :].tolist()


def make_prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (13,), generator=g).tolist()  # a common "system prompt"
    lens = (3, 9, 6, 20)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    prompts[1] = shared + prompts[1]
    prompts[3] = shared + prompts[3]
    return prompts


def greedy(engine, prompts):
    outs = engine.generate(prompts, SamplingParams(max_tokens=N_NEW, temperature=0.0))
    return [o.outputs[0].token_ids for o in outs]


def assert_all_free(engine):
    assert engine.bm.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.bm.blocks)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("name", sorted(ALL))
def test_greedy_equals_full_recompute(name):
    cfg = ALL[name]
    model = tiny_model(cfg)
    prompts = make_prompts(cfg.vocab_size)
    want = [greedy_reference(model, p, N_NEW) for p in prompts]

    cached = LLMEngine(model, block_size=4)
    for p, w in zip(prompts, want):  # alone
        assert greedy(cached, [p]) == [w]
    assert greedy(cached, prompts) == want  # batch; the prompts' blocks are now cached
    # (a recurrent state cannot be rebuilt from cached blocks: linear attention never shares)
    assert (cached.bm.prefix_hit_tokens > 0) == (cfg.attention != "linear")
    assert_all_free(cached)

    plain = LLMEngine(model, block_size=4, enable_prefix_caching=False)
    assert greedy(plain, prompts) == want
    assert plain.bm.prefix_hit_tokens == 0
    assert_all_free(plain)

    # 12 blocks of 4 slots hold ~48 tokens: the batch needs ~100, so sequences get preempted and
    # recomputed; a token budget of 10 also splits the long prompts into prefill chunks.
    tight = LLMEngine(model, block_size=4, num_blocks=12, max_num_batched_tokens=10)
    assert greedy(tight, prompts) == want
    assert tight.scheduler.num_preemptions > 0
    assert_all_free(tight)


def test_batch_of_many_uneven_requests_and_block_size_one():
    cfg = CONFIGS["llama3"]
    model = tiny_model(cfg)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (9,), generator=g)]
    want = [greedy_reference(model, p, N_NEW) for p in prompts]
    engine = LLMEngine(model, block_size=1, max_num_seqs=4)
    assert greedy(engine, prompts) == want
    assert_all_free(engine)


def test_requests_join_a_running_batch():
    """Continuous batching: a request added mid-generation joins and both stay exact."""
    cfg = CONFIGS["qwen3"]
    model = tiny_model(cfg)
    a, b = make_prompts(cfg.vocab_size)[:2]
    engine = LLMEngine(model, block_size=4)
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0)
    engine.add_request(a, params, request_id="a")
    got = {"a": [], "b": []}
    for step in range(100):
        if step == 4:
            engine.add_request(b, params, request_id="b")
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert got == {"a": greedy_reference(model, a, N_NEW), "b": greedy_reference(model, b, N_NEW)}
    assert_all_free(engine)


def test_abort_frees_blocks_and_reports_once():
    cfg = CONFIGS["llama3"]
    engine = LLMEngine(tiny_model(cfg), block_size=4, enable_prefix_caching=False)
    rid = engine.add_request(list(range(10)), SamplingParams(max_tokens=30, temperature=0.0, n=2))
    for _ in range(3):
        engine.step()
    assert engine.bm.num_free_blocks < engine.num_blocks
    engine.abort(rid)
    assert engine.bm.num_free_blocks == engine.num_blocks  # freed at once (no step running)
    outs = engine.step()
    assert sorted((o.index, o.finish_reason, o.finished) for o in outs) == [(0, "abort", True), (1, "abort", True)]
    assert engine.step() == []
    assert_all_free(engine)


def test_request_that_can_never_fit_ends_with_a_reason():
    cfg = CONFIGS["llama3"]  # max_seq_len 64
    engine = LLMEngine(tiny_model(cfg), block_size=4, num_blocks=8)
    too_long = engine.generate([list(range(60))], SamplingParams(max_tokens=10))[0].outputs[0]
    assert too_long.finish_reason == "error" and "exceeds the model's context of 64" in too_long.error
    too_big = engine.generate([list(range(20))], SamplingParams(max_tokens=20))[0].outputs[0]
    assert too_big.finish_reason == "error" and "KV blocks" in too_big.error
    ok = engine.generate([list(range(20))], SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0]
    assert ok.finish_reason == "length" and len(ok.token_ids) == 10
    empty = engine.generate([[]], SamplingParams(max_tokens=4))[0].outputs[0]
    assert empty.finish_reason == "error" and "empty" in empty.error
    assert_all_free(engine)


def test_bad_params_and_ids_raise_user_errors():
    from utils.errors import UserError

    engine = LLMEngine(tiny_model(CONFIGS["llama3"]), block_size=4)
    with pytest.raises(UserError, match="top_p"):
        engine.add_request([1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(UserError, match="max_tokens"):
        engine.add_request([1, 2], SamplingParams(max_tokens=1000))
    with pytest.raises(UserError, match=r"\[0, 128\)"):
        engine.add_request([1, 500], SamplingParams())
    assert not engine.has_unfinished()
