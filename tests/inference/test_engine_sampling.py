"""Engine-level sampling features: n > 1 sharing the prompt, per-request seeds, stop tokens,
stop strings (with a byte-level stand-in tokenizer), EOS, logprobs, streamed text."""
import pytest
import torch

from inference.detokenizer import IncrementalDetokenizer
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from tests.inference.test_engine import CONFIGS, greedy_reference, make_prompts, one_thread, tiny_model  # noqa: F401


class ByteTokenizer:
    """Stand-in for data_pipeline's Tokenizer: one token per UTF-8 byte, id 0 is EOS."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model():
    return tiny_model(CONFIGS["llama3"])


def test_n_siblings_share_the_prompt_blocks_and_differ(model):
    engine = LLMEngine(model, block_size=4, enable_prefix_caching=False)
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks + 1 partial
    engine.add_request(prompt, SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=5), request_id="r")
    engine.step()  # prefill once, fork into 4
    seqs = engine.requests["r"]
    assert len(seqs) == 4 and len({tuple(s.block_table) for s in seqs}) == 1
    assert engine.num_blocks - engine.bm.num_free_blocks == 5  # not 4 x 5
    engine.step()  # each writes into the shared partial block: copy-on-write
    assert engine.num_blocks - engine.bm.num_free_blocks == 5 + 3
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.index, []).extend(o.new_token_ids)
    seqs_tokens = [tuple(s.output_ids) for s in seqs]
    assert len(set(seqs_tokens)) > 1 and all(len(t) == 12 for t in seqs_tokens)
    assert engine.bm.num_free_blocks == engine.num_blocks
    # Same seed -> the same n samples again, on a fresh engine with other traffic around.
    other = LLMEngine(model, block_size=4)
    got = other.generate(
        [list(range(40, 50)), prompt], [SamplingParams(max_tokens=5), SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=5)]
    )[1]
    assert [tuple(c.token_ids) for c in got.outputs] == seqs_tokens


def test_seeded_sampling_is_reproducible_in_any_batch(model):
    p = make_prompts(128)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=123)
    alone = LLMEngine(model, block_size=4).generate([p[2]], sp)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.0)
    batch = LLMEngine(model, block_size=4).generate([p[0], p[2], p[3]], [others, sp, others])
    assert batch[1].outputs[0].token_ids == alone
    reseeded = LLMEngine(model, block_size=4).generate([p[2]], SamplingParams(**{**sp.__dict__, "seed": 124}))
    assert reseeded[0].outputs[0].token_ids != alone


def test_stop_token_ids_and_eos(model):
    prompt = make_prompts(128)[1]
    full = greedy_reference(model, prompt, 12)
    stop_tok = full[4]
    cut = full.index(stop_tok)
    engine = LLMEngine(model, block_size=4)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == full[: cut + 1] and out.finish_reason == "stop"  # the stop token is kept
    # The tokenizer's EOS stops too, unless ignore_eos.
    eos_engine = LLMEngine(model, block_size=4, tokenizer=type("T", (ByteTokenizer,), {"eos_id": stop_tok})())
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0]
    assert out.token_ids == full[: cut + 1] and out.finish_reason == "stop"
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == full and out.finish_reason == "length"


def test_stop_string_cuts_text_and_is_never_streamed(model):
    tok = ByteTokenizer()
    prompt = [t or 1 for t in make_prompts(128)[3]]
    full = greedy_reference(model, prompt, 16)
    if 0 in full:
        full = full[: full.index(0)]
    text = tok.decode(full)
    stop = text[5:8]  # spans several tokens
    start = text.index(stop)
    engine = LLMEngine(model, block_size=4, tokenizer=tok)
    engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=[stop, "never-there"]), request_id="s")
    streamed, last = "", None
    while engine.has_unfinished():
        for o in engine.step():
            streamed += o.new_text
            assert stop not in streamed
            last = o
    assert last.finished and last.finish_reason == "stop"
    assert last.text == streamed == text[:start]
    assert last.output_token_ids == full[: start + len(stop)]  # through the token that completed the stop


def test_streamed_text_equals_final_text_without_stops(model):
    tok = ByteTokenizer()
    engine = LLMEngine(model, block_size=4, tokenizer=tok)
    prompt = [t or 1 for t in make_prompts(128)[0]]
    engine.add_request(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    streamed, outs = "", []
    while engine.has_unfinished():
        for o in engine.step():
            streamed += o.new_text
            outs.append(o)
    assert streamed == outs[-1].text == tok.decode(outs[-1].output_token_ids)


def test_detokenizer_waits_for_complete_utf8_characters():
    tok = ByteTokenizer()
    ids = list("héllo €!".encode())
    d = IncrementalDetokenizer(tok, stop=[])
    pieces = []
    for i in range(1, len(ids) + 1):
        d.update(ids[:i])
        pieces.append(d.new_text(False))
    assert "".join(pieces) == "héllo €!" and "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the 2-byte é appears only when complete


def test_logprobs_match_full_recompute(model):
    prompt = make_prompts(128)[1]
    engine = LLMEngine(model, block_size=4)
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 6
    idx = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref = model(idx)[0, len(prompt) - 1 : -1].log_softmax(-1)  # distribution of each generated token
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-4)
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()


def test_generate_returns_prompt_order_and_lengths(model):
    prompts = make_prompts(128)
    outs = LLMEngine(model, block_size=4, max_num_seqs=2).generate(prompts, SamplingParams(max_tokens=3, temperature=0.0))
    assert [o.prompt_ids for o in outs] == prompts
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 3 for o in outs)
