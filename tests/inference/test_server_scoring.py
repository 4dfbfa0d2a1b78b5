"""The server as an evaluation backend, over real HTTP with the official openai client:
``echo`` + ``logprobs`` give the prompt's log-probabilities (the numbers eval/mmlu.py computes),
``max_tokens: 0`` scores without generating, /v1/completions stops at the chat format's
end-of-turn after an assistant header and at ``stop_token_ids``, and /tokenize, /detokenize and
/tokenizer_info answer in vLLM's shapes with the server's own ids."""
from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch

from data_pipeline.synthetic.mmlu import generate_question
from data_pipeline.tokenizer.chat_template import generation_prompt_ids, render_chat
from eval.mmlu import build_prompt, letter_logprobs, letter_token_ids
from inference import server
from inference.async_engine import AsyncEngine
from inference.sampling_params import SamplingParams
from tests.inference import test_server_helpers as H

MODEL = "tiny"
CTX = 256


def serve(tok, engine, **settings):
    settings = server.ServerSettings(model_name=MODEL, max_model_len=CTX, max_tokens_cap=128, n_cap=4, **settings)
    return H.LiveServer(server.build_app(AsyncEngine(engine, max_concurrent=64), tok, settings))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def live(tok):
    engine = H.tiny_engine(tok, CTX)
    with serve(tok, engine) as url:
        yield url, engine.model


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def mmlu_prompt(tok, seed: int) -> list[int]:
    rng = random.Random(seed)
    dev = [generate_question(rng, "elementary_arithmetic") for _ in range(2)]
    return build_prompt(tok, "elementary_arithmetic", dev, generate_question(rng, "elementary_arithmetic"), 2, CTX - 1)[0]


def test_echo_logprobs_are_eval_mmlu_letter_scores(tok, live, client):
    """lm-eval's loglikelihood request (prompt ids + continuation, max_tokens 1, logprobs 1, echo)
    gives the letter log-probabilities eval/mmlu.py computes for the same prompt, <= 1e-4."""
    url, model = live
    letters = letter_token_ids(tok)
    for seed in range(3):
        prompt = mmlu_prompt(tok, seed)
        want = letter_logprobs(model, [prompt], letters)[0]
        got = []
        for letter in letters:
            out = client.completions.create(model=MODEL, prompt=prompt + letter, max_tokens=1, logprobs=1, echo=True, temperature=0)
            lp = out.choices[0].logprobs
            assert len(lp.token_logprobs) == len(prompt) + len(letter) + 1 and out.usage.completion_tokens == 1
            got.append(sum(lp.token_logprobs[len(prompt) : -1]))  # lm-eval's parse_logprobs
        assert torch.allclose(torch.tensor(got), want, atol=1e-4, rtol=0), (got, want)


def test_echo_shape(tok, client):
    text = "Once upon a time there was a robot"
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=3, logprobs=2, echo=True, temperature=0)
    choice, ids = out.choices[0], tok.encode(text)
    lp = choice.logprobs
    assert choice.text.startswith(text) and out.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 3
    assert "".join(lp.tokens[: len(ids)]) == text and lp.text_offset[: len(ids)] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value < 0 and len(top) <= 2 and max(top.values()) >= value - 1e-6
    stream = client.completions.create(model=MODEL, prompt=text, max_tokens=3, logprobs=2, echo=True, temperature=0, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert sum((c.logprobs.token_logprobs for c in chunks if c.logprobs), []) == lp.token_logprobs
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=3, echo=True, temperature=0)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None


def test_max_tokens_zero_scores_a_prompt_that_fills_the_context(client):
    prompt = [(7 * i) % 300 + 5 for i in range(CTX)]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    choice = out.choices[0]
    assert out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == CTX and all(t == {} for t in choice.logprobs.top_logprobs[1:])
    assert client.completions.create(model=MODEL, prompt=prompt[:5], max_tokens=0).choices[0].text == ""
    batch = client.completions.create(model=MODEL, prompt=[prompt[:5], prompt[:9]], max_tokens=0, logprobs=1, echo=True)
    assert [len(c.logprobs.tokens) for c in sorted(batch.choices, key=lambda c: c.index)] == [5, 9]


def test_stop_token_ids_on_both_endpoints(tok, client):
    def greedy(prompt_ids: list[int]) -> list[int]:  # the server's weights (same seed), through the engine
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        return H.tiny_engine(tok, CTX).generate([prompt_ids], params)[0].outputs[0].token_ids

    prompt = "What is 12 plus 30?"
    ids = greedy(tok.encode(prompt))
    stop, cut = ids[3], ids.index(ids[3])
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"stop_token_ids": [stop]})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == cut + 1
    assert out.choices[0].text == tok.decode(ids[:cut])
    messages = [{"role": "user", "content": prompt}]
    ids = greedy(render_chat(tok, messages, add_generation_prompt=True)[0])
    stop = next(t for t in ids[2:] if t not in tok.special_ids)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                          extra_body={"stop_token_ids": [stop], "ignore_eos": True})
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens == ids.index(stop) + 1


@pytest.fixture(scope="module")
def ends_turns(tok):
    """A model that always wants to close the turn (its <|im_end|> logit raised), as a chat-tuned
    model does after its answer."""
    engine = H.tiny_engine(tok, CTX)
    head = engine.model.logits
    bias = torch.zeros(tok.vocab_size)
    bias[tok.im_end_id] = 50.0
    engine.model.logits = lambda hidden: head(hidden) + bias.to(hidden.dtype)
    with serve(tok, engine) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completions_stop_at_end_of_turn_after_an_assistant_header(tok, ends_turns):
    """The measured failure: a chat rendered by the client (lm-eval --apply_chat_template) ran to
    max_tokens with finish_reason "length" though the model closed its turn at once."""
    chat, _ = render_chat(tok, [{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True)
    assert chat[-len(generation_prompt_ids(tok)):] == generation_prompt_ids(tok)
    out = ends_turns.completions.create(model=MODEL, prompt=chat, max_tokens=8, temperature=0, logprobs=0)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.text == "" and out.usage.completion_tokens == 1
    assert choice.logprobs.tokens == ["<|im_end|>"]  # reported, as vLLM does, but not in the text
    plain = ends_turns.completions.create(model=MODEL, prompt=chat[:-2], max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 8  # no header: no chat stop
    raw = ends_turns.completions.create(model=MODEL, prompt=chat, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert raw.choices[0].finish_reason == "length" and raw.usage.completion_tokens == 8


def test_tokenize_detokenize_and_tokenizer_info(tok, live, client):
    url = live[0]
    text = "Café crème, 12 plus 30"
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == CTX
    assert r["token_strs"] == [tok.id_to_token(t) for t in r["tokens"]] and r["token_strs"][-1] == "Ġ30"
    with_prefix = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": True}).json()["tokens"]
    assert with_prefix == list(tok.document_prefix) + r["tokens"]
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    chat = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == render_chat(tok, messages, add_generation_prompt=True)[0]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == chat["count"]
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == CTX and info["document_prefix"] == [tok.eos_id]
    assert "<|im_start|>" in info["chat_template"]


def test_clamp_max_tokens_is_opt_in(tok):
    prompt = list(range(5, 5 + CTX - 10))
    engine = H.tiny_engine(tok, CTX)
    with serve(tok, engine) as url:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 64})
        err = H.assert_error_shape(r, 400)
        assert err["code"] == "context_length_exceeded" and "max_gen_toks" in err["message"] and "clamp" in err["message"]
    with serve(tok, H.tiny_engine(tok, CTX), clamp_max_tokens=True) as url:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 64, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
        assert r.json()["choices"][0]["finish_reason"] == "length"
