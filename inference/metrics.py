"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus_client``.

Two kinds, kept apart:

- The engine's state, read when scraped (EngineCollector): requests running and waiting, KV
  blocks used and free, prefix-cache tokens queried and hit (and their ratio), preemptions, the
  speculative acceptance rate when a draft model runs.
- What requests saw, observed as their outputs reach the event loop (ServingMetrics, the
  AsyncEngine's observer): prompt and generated tokens, finished requests by finish reason, and
  histograms of time to first token, inter-token latency and end-to-end latency.

Each app owns its registry (no process-global state), so several servers can run in one process.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets (seconds), from a fast GPU token to a long CPU request.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EngineCollector:
    """Gauges and counters read from the LLMEngine at scrape time (plain reads of sizes and
    counters the engine thread updates; a scrape never takes a lock or waits for a step)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        sched, bm = self.engine.scheduler, self.engine.bm
        free = bm.num_free_blocks
        yield GaugeMetricFamily("llm_requests_running", "Sequences in the running batch.", value=len(sched.running))
        yield GaugeMetricFamily("llm_requests_waiting", "Sequences waiting to be scheduled.", value=len(sched.waiting))
        yield GaugeMetricFamily("llm_kv_blocks_used", "KV-cache blocks in use.", value=bm.num_blocks - free)
        yield GaugeMetricFamily("llm_kv_blocks_free", "KV-cache blocks free (cached contents may still be reused).", value=free)
        yield CounterMetricFamily("llm_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
                                  value=bm.prefix_query_tokens)
        yield CounterMetricFamily("llm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                  value=bm.prefix_hit_tokens)
        rate = bm.prefix_hit_tokens / bm.prefix_query_tokens if bm.prefix_query_tokens else 0.0
        yield GaugeMetricFamily("llm_prefix_cache_hit_rate", "Hit tokens / queried tokens since start.", value=rate)
        yield CounterMetricFamily("llm_preemptions", "Sequences preempted (KV blocks ran out).", value=sched.num_preemptions)
        acceptance = getattr(self.engine, "acceptance_rate", None)
        if acceptance is not None:
            yield GaugeMetricFamily("llm_speculative_acceptance_rate", "Draft tokens accepted / proposed.", value=acceptance)


class ServingMetrics:
    """Per-request observations; the AsyncEngine calls ``submitted`` and ``outputs``."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        r = self.registry
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("llm_sequences_finished", "Sequences finished, by finish reason.", ["finish_reason"], registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time from submission to the first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Time between a sequence's tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llm_e2e_request_latency_seconds", "Time from submission to the last token.",
                             buckets=E2E_BUCKETS, registry=r)

    def submitted(self, stream: Any, prompt_len: int) -> None:
        self.prompt_tokens.inc(prompt_len)
        stream.t_submit = time.perf_counter()
        stream.t_last = {}  # sequence index -> time of its last token
        stream.ended = set()  # indices of its finished sequences

    def outputs(self, stream: Any, outs: list) -> None:
        """One step's outputs of one request, as they reach the event loop."""
        now = time.perf_counter()
        for out in outs:
            n_new = len(out.new_token_ids)
            if n_new:
                self.generation_tokens.inc(n_new)
                last = stream.t_last.get(out.index)
                if last is None:
                    if not stream.t_last:  # the request's first token
                        self.ttft.observe(now - stream.t_submit)
                else:  # a step's tokens (speculative decoding gives several) share its gap
                    for _ in range(n_new):
                        self.itl.observe((now - last) / n_new)
                stream.t_last[out.index] = now
            if out.finished:
                self.finished.labels(out.finish_reason or "unknown").inc()
                stream.ended.add(out.index)
                if len(stream.ended) == stream.n and out.finish_reason in ("stop", "length"):
                    self.e2e.observe(now - stream.t_submit)  # the request's last sequence ended

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
