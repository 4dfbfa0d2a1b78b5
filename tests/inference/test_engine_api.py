"""Engine API around the loop: from_checkpoint with its tokenizer, driving step() from one
thread while another adds and aborts, recurrent (linear attention) n > 1, cache sizing."""
import threading
import time

import pytest
import torch

from inference.engine import LLMEngine, kv_bytes_per_token
from inference.sampling_params import SamplingParams
from model import ModelConfig
from tests.inference.test_engine import CONFIGS, EXTRA, greedy_reference, make_prompts, one_thread, tiny_model  # noqa: F401


def test_from_checkpoint_loads_model_and_tokenizer(tmp_path):
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from utils.checkpoint import save_checkpoint

    texts = ["once upon a time there was a little cat", "the cat sat on the mat and was happy"] * 20
    tok_file = tmp_path / "tok.json"
    hf_tok = train_hf(texts, 300, show_progress=False)
    hf_tok.save(str(tok_file))
    cfg = ModelConfig(vocab_size=hf_tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    model = tiny_model(cfg)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tok_file)
    engine = LLMEngine.from_checkpoint(str(ckpt), block_size=4)
    assert engine.tokenizer is not None and engine.eos_id == 0
    prompt = engine.tokenizer.encode("once upon a time")
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == greedy_reference(model, prompt, 8)
    assert out.text == engine.tokenizer.decode(out.token_ids)


def test_step_thread_with_concurrent_add_and_abort():
    """A server drives step() in one thread; requests arrive and are aborted from another."""
    cfg = CONFIGS["llama3"]
    model = tiny_model(cfg)
    engine = LLMEngine(model, block_size=4)
    prompts = make_prompts(cfg.vocab_size)
    got: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
            if not engine.has_unfinished():
                time.sleep(0.001)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        engine.add_request(list(range(1, 20)), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                           request_id="doomed")
        # Abort as soon as it runs: its 39 remaining tokens take 39 steps, the abort one call
        # (aborting after fixed sleeps raced a fast machine, which finished all 40 tokens first).
        deadline = time.time() + 60
        while not got.get("doomed") and time.time() < deadline:
            time.sleep(0.0005)
        engine.abort("doomed")
        for i, p in enumerate(prompts):
            engine.add_request(p, SamplingParams(max_tokens=8, temperature=0.0), request_id=f"r{i}")
            time.sleep(0.01)
        deadline = time.time() + 60
        while len(reasons) < len(prompts) + 1 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert reasons == {"doomed": "abort", **{f"r{i}": "length" for i in range(len(prompts))}}
    assert all(got[f"r{i}"] == greedy_reference(model, p, 8) for i, p in enumerate(prompts))
    assert engine.bm.num_free_blocks == engine.num_blocks and not engine.has_unfinished()


def test_recurrent_model_n_siblings_and_seeds():
    model = tiny_model(EXTRA["linear_attention"])
    prompt = make_prompts(128)[3]
    greedy = LLMEngine(model, block_size=4).generate([prompt], SamplingParams(n=2, max_tokens=8, temperature=0.0))[0]
    assert [c.token_ids for c in greedy.outputs] == [greedy_reference(model, prompt, 8)] * 2  # the fork copies the state
    sp = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11)
    a = LLMEngine(model, block_size=4).generate([prompt], sp)[0]
    b = LLMEngine(model, block_size=4, max_num_seqs=3).generate([make_prompts(128)[0], prompt], [SamplingParams(max_tokens=3), sp])[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_cache_sizing_from_a_memory_budget():
    cfg = CONFIGS["llama3"]  # 2 layers, 2 KV heads of 16 dims: k and v in fp32
    model = tiny_model(cfg)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    assert kv_bytes_per_token(model, torch.device("cpu")) == per_token
    engine = LLMEngine(model, block_size=8, kv_cache_memory=per_token * 8 * 10)
    assert engine.num_blocks == 10
    default = LLMEngine(model, block_size=8, max_num_seqs=4)
    assert default.num_blocks == 4 * cfg.max_seq_len // 8  # room for max_num_seqs full-length sequences


def test_duplicate_live_request_id_is_refused():
    from utils.errors import UserError

    engine = LLMEngine(tiny_model(CONFIGS["llama3"]), block_size=4)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=5), request_id="x")
    with pytest.raises(UserError, match="already in use"):
        engine.add_request([4, 5, 6], SamplingParams(max_tokens=5), request_id="x")
    while engine.has_unfinished():
        engine.step()
    engine.add_request([4, 5, 6], SamplingParams(max_tokens=5), request_id="x")  # free again once finished
    while engine.has_unfinished():
        engine.step()
    assert engine.bm.num_free_blocks == engine.num_blocks


def test_bad_engine_settings_are_user_errors():
    from utils.errors import UserError

    model = tiny_model(CONFIGS["llama3"])
    with pytest.raises(UserError, match="max_model_len"):
        LLMEngine(model, max_model_len=1000)
    other_vocab = tiny_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    with pytest.raises(UserError, match="vocab_size"):
        LLMEngine(model, draft_model=other_vocab)


def test_prefix_cache_skips_the_shared_prompt():
    cfg = CONFIGS["llama3"]
    model = tiny_model(cfg)
    system = list(range(1, 34))  # 33 tokens: 8 full blocks of 4
    a, b = system + [40, 41], system + [50, 51, 52]
    engine = LLMEngine(model, block_size=4)
    first = engine.generate([a], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0]
    computed_before = engine.stats["prompt_tokens"]
    engine.add_request(b, SamplingParams(max_tokens=4, temperature=0.0), request_id="b")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[0].num_cached_tokens == 32 and engine.stats["prompt_tokens"] - computed_before == len(b) - 32
    assert sum((o.new_token_ids for o in outs), []) == greedy_reference(model, b, 4)
    assert first.token_ids == greedy_reference(model, a, 4)


def test_n_above_max_num_seqs_is_an_error_not_a_stall():
    """Found under test: n > max_num_seqs was never scheduled and blocked every later request
    while the engine spun (1.24M empty steps in 5 s)."""
    cfg = CONFIGS["llama3"]
    engine = LLMEngine(tiny_model(cfg), block_size=4, max_num_seqs=2)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, n=3), request_id="wide")
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0), request_id="after")
    reasons, steps = {}, 0
    while engine.has_unfinished() and steps < 50:
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = (out.finish_reason, out.error)
        steps += 1
    assert reasons["after"][0] == "length" and steps < 50
    assert reasons["wide"][0] == "error" and "max_num_seqs" in reasons["wide"][1]
