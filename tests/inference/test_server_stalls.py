"""Stalls found under test: huge prompts must not hold the event loop (tokenized off it, and a
prompt that cannot fit is refused before tokenizing), and a client that hangs up mid-upload is
one quiet log line, not a traceback."""
from __future__ import annotations

import asyncio
import logging
import socket
import time

import httpx
import pytest

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"


class CountingSlowTokenizer:
    """The test tokenizer, with ``encode`` counted and made to take ``delay`` s (sleeping, as a
    long text in the Rust tokenizer takes seconds without holding the GIL)."""

    def __init__(self, tok, delay: float):
        self._tok, self.delay, self.encoded = tok, delay, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        time.sleep(self.delay)
        return self._tok.encode(text)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def serve(tokenizer, max_model_len=128):
    engine = H.tiny_engine(tokenizer._tok, max_model_len)
    engine.tokenizer = tokenizer
    settings = server.ServerSettings(model_name=MODEL, max_model_len=max_model_len, max_tokens_cap=16, n_cap=2,
                                     max_body_bytes=4_000_000)
    return H.LiveServer(server.build_app(AsyncEngine(engine), tokenizer, settings))


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(tok):
    slow = CountingSlowTokenizer(tok, 0.0)
    with serve(slow) as url:
        limit = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert limit.status_code == 200 and slow.encoded == 1
        huge = "Once upon a time " * 60_000  # ~1 MB
        for endpoint, body in (("completions", {"prompt": huge}), ("completions", {"prompt": ["Hi", huge]}),
                               ("chat/completions", {"messages": [{"role": "user", "content": huge}]})):
            r = httpx.post(f"{url}/v1/{endpoint}", json={"model": MODEL, "max_tokens": 1, **body}, timeout=30)
            err = H.assert_error_shape(r, 400)
            assert err["code"] == "context_length_exceeded" and "characters" in err["message"], err
        assert slow.encoded == 1  # none of them was tokenized


def test_long_prompts_are_tokenized_off_the_event_loop(tok):
    """Before: each prompt was tokenized on the event loop, so /health waited for all of them
    (16 x 1 MB stalled it 7.2 s). Four prompts that take 1 s each to tokenize must leave /health
    answering at once."""
    slow = CountingSlowTokenizer(tok, 1.0)

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1}
            posts = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(4)]
            await asyncio.sleep(0.2)  # all four are being tokenized
            waits = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                waits.append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)
            replies = await asyncio.gather(*posts)
            return waits, replies

    with serve(slow) as url:
        waits, replies = asyncio.run(scenario(url))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert slow.encoded == 4
    assert max(waits) < slow.delay / 2, waits  # on the loop, the first /health waited >= 1 s


def test_a_client_that_hangs_up_mid_upload_is_one_quiet_line(tok, caplog):
    with serve(CountingSlowTokenizer(tok, 0.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not reach the root logger
        uvicorn_log.addHandler(caplog.handler)
        with caplog.at_level(logging.INFO):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n" + b'{"model": "tiny", "prompt": "' + b"a" * 1000)
                time.sleep(0.3)
            time.sleep(0.5)  # the server notices the hang-up
            assert httpx.get(url + "/health").status_code == 200
        uvicorn_log.removeHandler(caplog.handler)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Exception in ASGI application" not in text and not any(r.exc_info for r in caplog.records), text
    assert "disconnected" in text, text


def test_stop_strings_are_capped(tok):
    """Before: 8 requests with 60k stop strings each slowed a bystander from 0.22 s to 8.1 s (every
    string searched on every token). Now 4 per request (the OpenAI limit) of bounded length."""
    from inference.sampling_params import MAX_STOP_CHARS

    with serve(CountingSlowTokenizer(tok, 0.0)) as url:
        body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json={**body, "stop": ["a", "b", "c", "d"]}).status_code == 200
        many = httpx.post(f"{url}/v1/completions", json={**body, "stop": [f"s{i}" for i in range(60_000)]})
        assert H.assert_error_shape(many, 400)["param"] == "stop"
        long = httpx.post(f"{url}/v1/completions", json={**body, "stop": ["x" * (MAX_STOP_CHARS + 1)]})
        assert "at most" in H.assert_error_shape(long, 400)["message"]
