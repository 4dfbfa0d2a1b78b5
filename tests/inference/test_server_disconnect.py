"""Clients that hang up abort their requests: the engine frees every KV block and the server
keeps answering promptly."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"
STEP = 0.01  # seconds per engine step: one 200-token request alone would take >= 2 s


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    engine = H.slow_down(H.tiny_engine(tok, 256, max_num_seqs=8), STEP)
    async_engine = AsyncEngine(engine, max_concurrent=64)
    settings = server.ServerSettings(model_name=MODEL, max_model_len=256, max_tokens_cap=256)
    with H.LiveServer(server.build_app(async_engine, tok, settings)) as url:
        yield url, engine, async_engine


def wait_until(predicate, timeout: float) -> float:
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return time.time() - start


def test_cancelled_requests_free_their_blocks(live):
    url, engine, async_engine = live
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 200, "ignore_eos": True}
    long_completion = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}

    async def impatient_clients() -> list:
        # Each client gives up after 0.4 s in total (httpx's own timeout is per read, and a
        # stream that keeps sending never trips it), which closes its connection mid-request.
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def request(i: int) -> None:
                path, body = ("/v1/chat/completions", long_chat) if i % 2 else ("/v1/completions", long_completion)
                body = {**body, "stream": i % 4 < 2}
                if body["stream"]:
                    async with client.stream("POST", path, json=body) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    await client.post(path, json=body)

            async def impatient(i: int):
                try:
                    await asyncio.wait_for(request(i), 0.4)
                except TimeoutError as err:
                    return err
                return None

            return await asyncio.gather(*(impatient(i) for i in range(24)))

    results = asyncio.run(impatient_clients())
    assert all(isinstance(r, asyncio.TimeoutError) for r in results), [r for r in results if not isinstance(r, asyncio.TimeoutError)]
    # Had the requests run to the end this would take 24*200/8 steps * 10 ms = 6 s.
    waited = wait_until(lambda: async_engine.num_in_flight == 0 and not engine.has_unfinished()
                        and engine.bm.num_free_blocks == engine.num_blocks, timeout=2.0)
    assert engine.stats["generated_tokens"] < 24 * 200 / 2, "requests were not aborted"
    t0 = time.time()
    r = httpx.post(url + "/v1/chat/completions", timeout=10,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert time.time() - t0 < 1.5, f"server slow after cancellations ({time.time() - t0:.2f} s); blocks freed after {waited:.2f} s"
    assert engine.bm.num_free_blocks == engine.num_blocks
