"""The OpenAI-compatible server against the official openai client, over real HTTP."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.tokenizer.tokenizer import SPECIAL_TOKENS
from inference import server
from inference.async_engine import AsyncEngine
from inference.sampling_params import SamplingParams
from tests.inference import test_server_helpers as H

MODEL = "tiny"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    engine = H.tiny_engine(tok, 256)
    settings = server.ServerSettings(model_name=MODEL, max_model_len=256, max_tokens_cap=128, n_cap=4)
    app = server.build_app(AsyncEngine(engine, max_concurrent=64), tok, settings)
    with H.LiveServer(app) as url:
        yield url, engine, tok


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(live[0] + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_stream_equals_non_stream_at_temperature_0(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    pieces, reasons, usage, roles = [], [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == full.choices[0].message.content
    assert len(pieces) > 3, "text should arrive in several chunks"
    assert roles[0] == "assistant" and reasons[-1] == full.choices[0].finish_reason
    assert usage is not None and usage.model_dump() == full.usage.model_dump()


def test_prompt_tokens_are_the_rendered_chat(live, client):
    url, engine, tok = live
    ids, _ = render_chat(tok, MESSAGES, add_generation_prompt=True)
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=5)
    assert full.usage.prompt_tokens == len(ids)
    assert full.usage.completion_tokens == 5 and full.choices[0].finish_reason == "length"


def test_n_choices_and_completion_endpoint(live, client):
    url, engine, tok = live
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=6, temperature=0)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    n_length = sum(c.finish_reason == "length" for c in chat.choices)
    assert 6 * n_length <= chat.usage.completion_tokens <= 18
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert comp.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    by_ids = client.completions.create(model=MODEL, prompt=tok.encode("Once upon a time"), max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == comp.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=["Once upon a time", "The cat"], max_tokens=4, temperature=0, n=2)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.choices[0].text == comp.choices[0].text[: len(batch.choices[0].text)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text


def test_stop_string_is_cut_and_reported(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0, stop=stop, stream=True)
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_logprobs_and_token_accounting(live, client):
    url, engine, tok = live
    kw = dict(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=12, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == a  # seeded sampling reproduces
    assert any(client.chat.completions.create(**{**kw, "seed": s}).choices[0].message.content != a for s in (1, 2, 3))
    lp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)
    # the tokens' raw bytes add up to the reply's UTF-8 (even where a token holds half a character)
    sampled = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Café 中文 🙂"}], temperature=1.0,
                                             seed=3, max_tokens=40, logprobs=True)
    raw = b"".join(bytes(e.bytes) for e in sampled.choices[0].logprobs.content if e.token not in SPECIAL_TOKENS)
    assert raw.decode("utf-8", errors="replace") == sampled.choices[0].message.content
    comp = client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, temperature=0, logprobs=2)
    assert len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens
    assert all(len(d) <= 2 for d in comp.choices[0].logprobs.top_logprobs)


def test_text_is_the_decoded_tokens(live):
    """Streamed text is exactly the decoded output tokens (UTF-8 held back across token
    boundaries, nothing lost), for a random model that emits arbitrary bytes. The reference ids
    come from a second engine with the same weights run directly (seeded sampling is per request)."""
    url, engine, tok = live
    body = {"model": MODEL, "prompt": "Café 中文", "max_tokens": 60, "temperature": 1.0, "seed": 7, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    text, n_logprobs = "", 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                n_logprobs += len(choice["logprobs"]["tokens"])
    assert n_logprobs == 60  # every token's logprob arrives, even while its text is held back
    full = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30).json()
    assert full["choices"][0]["text"] == text and full["usage"]["completion_tokens"] == 60
    reference = H.tiny_engine(tok, 256).generate([tok.encode("Café 中文")], SamplingParams(max_tokens=60, temperature=1.0, seed=7, ignore_eos=True))
    assert text == tok.decode(reference[0].outputs[0].token_ids)
