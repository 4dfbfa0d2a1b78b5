"""Server throughput: 32 concurrent HTTP requests vs HuggingFace generate(), sequential and batched.

    python bench/bench_server.py [--checkpoint DIR] [--concurrency 32] [--lengths mixed|fixed]

Both sides run the same weights in the same run: our checkpoint is served by
``inference/server.py`` (a subprocess, over real HTTP, streaming /v1/completions with
token-id prompts), and exported with ``model.hf_interop.export_hf`` for
``AutoModelForCausalLM.from_pretrained(...).generate()`` in two ways: one prompt at a time with
its KV cache (what a script without a serving engine does), and all prompts in one call, left
padded (the fairer baseline: HF's own batching). With ``--lengths mixed`` (the default) prompts
are 16-128 tokens and each request asks for 16-128 new tokens; the batched call must run to the
longest, so its tokens/s counts only the tokens each request asked for. ``fixed``: every prompt
``--prompt-len`` tokens, every request ``--max-tokens``. Greedy, ignore_eos / min_new_tokens.

Prints output tokens/s of each and the ratios, time to first token (p50/p95) under load,
and how many greedy outputs agree with sequential HF. Without ``--checkpoint`` it builds a
random-weight Llama-style model and a BPE tokenizer trained on the synthetic stories.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch


def build_default_checkpoint(out: Path, vocab_size: int, d_model: int, n_layers: int) -> Path:
    """Random-weight model + a BPE tokenizer trained on the synthetic stories (seconds on CPU)."""
    from data_pipeline.synthetic.stories import generate_story
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from model.config import ModelConfig
    from model.transformer import Transformer
    from utils.checkpoint import save_checkpoint

    rng = random.Random(0)
    texts = [generate_story(rng)[0] for _ in range(2000)]
    tok = train_hf(texts, vocab_size, show_progress=False)
    tok_path = out.parent / "bench_tokenizer.json"
    tok.save(str(tok_path))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=d_model, n_layers=n_layers, n_heads=d_model // 64,
                      n_kv_heads=max(1, d_model // 128), max_seq_len=512)
    return save_checkpoint(out, Transformer(cfg), tokenizer_path=tok_path)


def make_requests(vocab_size: int, count: int, args, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) per request; ids 0..4 are special and not used."""
    g = random.Random(seed)
    out = []
    for _ in range(count):
        n, m = (g.randint(16, 128), g.randint(16, 128)) if args.lengths == "mixed" else (args.prompt_len, args.max_tokens)
        out.append(([g.randrange(5, vocab_size) for _ in range(n)], m))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, concurrency: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "inference/server.py"), "--checkpoint", str(ckpt),
           "--port", str(port), "--max-num-seqs", str(concurrency), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op pool, same as the HF side
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, t0: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    first, text, usage = None, "", None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["text"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft": first - t0, "end": time.perf_counter(), "tokens": usage["completion_tokens"], "text": text}


async def run_http(port: int, model: str, requests: list[tuple[list[int], int]]) -> tuple[float, list[dict]]:
    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        await one_request(client, model, requests[0][0], 4, time.perf_counter())  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, model, p, m, t0) for p, m in requests))
    return max(r["end"] for r in results) - t0, results


def load_hf(ckpt: Path, workdir: Path):
    from transformers import AutoModelForCausalLM

    from model.hf_interop import export_hf
    from model.load import load_model

    hf_dir = export_hf(load_model(ckpt), workdir / "hf")
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _hf_kw(n: int) -> dict:
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def run_hf(model, requests: list[tuple[list[int], int]]) -> tuple[float, list[list[int]]]:
    """Sequential generate() with HF's KV cache, greedy, exactly the requested new tokens each."""
    with torch.inference_mode():
        model.generate(torch.tensor([requests[0][0]]), **_hf_kw(4))  # warm-up
        outputs, t0 = [], time.perf_counter()
        for p, m in requests:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **_hf_kw(m))
            outputs.append(out[0, len(p):].tolist())
    return time.perf_counter() - t0, outputs


def run_hf_batched(model, requests: list[tuple[list[int], int]]) -> tuple[float, int]:
    """All prompts in one generate() call, left padded, run to the longest request. Returns the
    time and the tokens the requests asked for (the rest of each row is work nobody wanted)."""
    T = max(len(p) for p, _ in requests)
    ids = torch.zeros(len(requests), T, dtype=torch.long)
    mask = torch.zeros(len(requests), T, dtype=torch.long)
    for i, (p, _) in enumerate(requests):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], **_hf_kw(4))  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, **_hf_kw(max(m for _, m in requests)))
    return time.perf_counter() - t0, sum(m for _, m in requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--lengths", choices=["mixed", "fixed"], default="mixed",
                        help="mixed: prompts and outputs of 16-128 tokens; fixed: --prompt-len and --max-tokens")
    parser.add_argument("--hf-requests", type=int, default=8, help="prompts HF generates (sequential: tok/s does not depend on it)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: 1 on <= 2 cores, where a busy machine makes "
                             "multi-threaded kernels spin and both sides slower; else torch's default)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads())
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else build_default_checkpoint(work / "ckpt", args.vocab_size, args.d_model, args.n_layers)
        from model.load import read_config

        cfg = read_config(ckpt)
        requests = make_requests(cfg.vocab_size, args.concurrency, args)
        print(f"model: d_model={cfg.d_model} n_layers={cfg.n_layers} vocab={cfg.vocab_size}; {args.concurrency} requests, "
              f"{args.lengths} lengths (prompts {min(len(p) for p, _ in requests)}-{max(len(p) for p, _ in requests)}, "
              f"outputs {min(m for _, m in requests)}-{max(m for _, m in requests)} tokens); "
              f"torch threads={torch.get_num_threads()}", flush=True)

        # HF runs before and after the server so a change in machine load shows up as a spread.
        hf = load_hf(ckpt, work)
        seq = requests[: args.hf_requests]
        hf_time, hf_outputs = run_hf(hf, seq)
        hf_rates = [sum(map(len, hf_outputs)) / hf_time]
        bt, bn = run_hf_batched(hf, requests)
        batched_rates = [bn / bt]
        print(f"HF generate, sequential: {hf_rates[0]:8.1f} output tok/s ({hf_time:.2f} s); batched (one call, left "
              f"padded): {batched_rates[0]:8.1f} ({bt:.2f} s)", flush=True)

        port = free_port()
        proc = start_server(ckpt, port, args.concurrency, threads)
        try:
            model_name = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            wall, results = asyncio.run(run_http(port, model_name, requests))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        hf_time2, _ = run_hf(hf, seq)
        hf_rates.append(sum(map(len, hf_outputs)) / hf_time2)
        bt2, _ = run_hf_batched(hf, requests)
        batched_rates.append(bn / bt2)
        print(f"HF generate again: sequential {hf_rates[1]:8.1f}, batched {batched_rates[1]:8.1f} output tok/s", flush=True)
        hf_tps, batched_tps = statistics.mean(hf_rates), statistics.mean(batched_rates)
        tokens = sum(r["tokens"] for r in results)
        srv_tps = tokens / wall
        ttfts = sorted(r["ttft"] for r in results)
        p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
        print(f"server, {args.concurrency} concurrent (HTTP): {srv_tps:8.1f} output tok/s ({wall:.2f} s, {tokens} tokens)")
        print(f"vs sequential HF: {srv_tps / hf_tps:.2f}x (runs {srv_tps / max(hf_rates):.2f}x .. {srv_tps / min(hf_rates):.2f}x); "
              f"vs batched HF: {srv_tps / batched_tps:.2f}x (runs {srv_tps / max(batched_rates):.2f}x .. "
              f"{srv_tps / min(batched_rates):.2f}x)")
        print(f"time to first token under load: p50 {statistics.median(ttfts) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
              f"max {ttfts[-1] * 1000:.0f} ms")

        from model.load import load_tokenizer

        tok = load_tokenizer(ckpt)
        same = sum(tok.decode(h) == r["text"] for h, r in zip(hf_outputs, results))
        print(f"greedy outputs equal to sequential HF's (as text): {same}/{len(hf_outputs)}")
        figures = {"hf_tok_s": hf_tps, "hf_batched_tok_s": batched_tps, "server_tok_s": srv_tps,
                   "speedup": srv_tps / hf_tps, "speedup_vs_batched": srv_tps / batched_tps,
                   "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": p95, "concurrency": args.concurrency,
                   "lengths": args.lengths, "same_greedy": f"{same}/{len(hf_outputs)}", "hf_tok_s_runs": hf_rates,
                   "hf_batched_tok_s_runs": batched_rates, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()}
        if args.out:
            Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    from utils.cli import main_guard

    main_guard(main)
