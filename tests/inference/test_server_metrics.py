"""GET /metrics: Prometheus text a real scraper parses, scraped while requests run; the counts
agree with what the requests were told (usage) and the engine's state returns to idle."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def scrape(text: str) -> dict[str, float]:
    """Sample name (with labels for labelled ones) -> value, as a Prometheus server reads it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            key = s.name + (f"{{{label}}}" if label else "")
            if "le" in s.labels:
                key += f"[le={s.labels['le']}]"
            out[key] = s.value
    return out


def test_metrics_under_load_agree_with_usage(tok):
    # Six prompts sharing a long prefix (prefix-cache hits), in 12 blocks of 16 tokens: too few
    # for six requests growing by 40 tokens each, so some are preempted.
    engine = H.slow_down(H.tiny_engine(tok, 128, max_num_seqs=6, num_blocks=12, block_size=16), 0.003)
    settings = server.ServerSettings(model_name=MODEL, max_model_len=128, max_tokens_cap=64, n_cap=2)
    prompts = [" ".join(H.CORPUS[:3]) + f" Robot {i}" for i in range(6)]

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = lambda p: {"model": MODEL, "prompt": p, "max_tokens": 40, "ignore_eos": True, "temperature": 0}  # noqa: E731
            posts = [asyncio.create_task(client.post("/v1/completions", json=body(p))) for p in prompts]
            busy = []
            while not all(p.done() for p in posts):
                r = await client.get("/metrics")
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
                busy.append(scrape(r.text))
                await asyncio.sleep(0.02)
            replies = [p.result().json() for p in posts]
            return busy, replies, scrape((await client.get("/metrics")).text)

    with H.LiveServer(server.build_app(AsyncEngine(engine), tok, settings)) as url:
        busy, replies, after = asyncio.run(scenario(url))

    assert any(m["llm_requests_running"] + m["llm_requests_waiting"] > 0 and m["llm_kv_blocks_used"] > 0 for m in busy)
    assert after["llm_requests_running"] == after["llm_requests_waiting"] == after["llm_kv_blocks_used"] == 0
    assert after["llm_kv_blocks_free"] == 12
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in replies)
    generated = sum(r["usage"]["completion_tokens"] for r in replies)
    assert after["llm_prompt_tokens_total"] == prompt_tokens
    assert after["llm_generation_tokens_total"] == generated == 40 * len(replies)
    assert after["llm_sequences_finished_total{finish_reason=length}"] == len(replies)
    assert after["llm_time_to_first_token_seconds_count"] == after["llm_e2e_request_latency_seconds_count"] == len(replies)
    assert after["llm_inter_token_latency_seconds_count"] == generated - len(replies)
    assert after["llm_preemptions_total"] > 0, after  # the cache was too small for all six at once
    assert after["llm_prefix_cache_hit_tokens_total"] > 0 and 0 < after["llm_prefix_cache_hit_rate"] <= 1
    # histograms are cumulative: the +Inf bucket holds every observation
    assert after["llm_e2e_request_latency_seconds_bucket[le=+Inf]"] == len(replies)
