"""The OpenAI-compatible server against the official openai client, over real HTTP."""
from __future__ import annotations

import httpx
import openai
import pytest

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = H.HFTokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    engine = H.FakeEngine(tok.vocab_size, max_model_len=256, eos_id=tok.eos_id)
    settings = server.ServerSettings(model_name=MODEL, max_model_len=256, max_tokens_cap=128, n_cap=4)
    original = server.chat_format
    server.chat_format = lambda: (H.render_chat, H.chat_stop_ids)
    app = server.build_app(AsyncEngine(engine, max_concurrent=64), tok, settings)
    with H.LiveServer(app) as url:
        yield url, engine, tok
    server.chat_format = original


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
    ids, _ = H.render_chat(tok, MESSAGES)
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=5)
    assert full.usage.prompt_tokens == len(ids)
    assert full.usage.completion_tokens == 5 and full.choices[0].finish_reason == "length"


def test_n_choices_and_completion_endpoint(live, client):
    url, engine, tok = live
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=6, temperature=0)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert chat.usage.completion_tokens == sum(6 if c.finish_reason == "length" else 0 for c in chat.choices) or chat.usage.completion_tokens <= 18
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
