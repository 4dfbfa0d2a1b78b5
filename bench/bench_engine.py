"""Engine speed against HuggingFace ``generate()`` on the same weights, in one run.

    python bench/bench_engine.py [--d_model 256] [--n_layers 4] [--new_tokens 64] [--threads 1] [--sections 1234]
                                 [--baseline /path/to/another/checkout]

Both sides run with the same torch thread count (default 1: on a small shared CPU, the
OpenMP barriers of multi-threaded attention kernels dominate and make timings noise).

Builds a random-weight Llama-style model, exports it with ``model.hf_interop.export_hf`` and
loads it with ``AutoModelForCausalLM.from_pretrained`` (fp32, its KV cache, greedy), then prints:

1. batch-1 decode tokens/s: (time to N tokens - time to 1 token) / (N - 1), so prefill and
   start-up cancel; ours through ``LLMEngine.generate`` vs HF ``generate``. The two take
   turns and medians are compared (a shared, noisy machine then slows both alike).
2. throughput: 32 prompts of mixed length through one ``generate`` call (continuous batching)
   vs HF ``generate`` on each prompt in turn.
3. prefix cache: requests sharing a long system prompt, with the cache warm vs disabled.
4. prompt log-probabilities (lm-eval's loglikelihood requests: a shared few-shot prefix + one
   question + one answer letter each), scored with ``prompt_logprobs`` and ``max_tokens=0``,
   which compute every prompt position (no prefix-cache hit), against the same prompts
   generating one token with the prefix cache warm, and with it off.
5. with ``--baseline DIR`` (another checkout, e.g. ``git worktree add /tmp/base main``): this
   engine against that checkout's ``inference/`` on the same weights in the same process, taking
   turns (batch-1 decode and the 32-prompt batch): a change's effect on the decode path
   (``--cpu_time``: CPU time, which on a loaded machine drops the waits for a core).

Greedy outputs of ours and HF are checked to agree.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import tempfile
import time

import torch

from utils.cli import main_guard


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved_medians(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Median time of each function, the functions taking turns (in reverse order every other
    round, so none always runs right after the same neighbour). ``clock=time.process_time``
    counts this process's CPU time: with one thread, the time waiting for a shared core drops out."""
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in list(fns)[:: 1 if r % 2 == 0 else -1]:
            t = clock()
            fns[k]()
            times[k].append(clock() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def build(args):
    from transformers import AutoModelForCausalLM

    from model.config import ModelConfig
    from model.hf_interop import export_hf
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.d_model // 64,
        n_kv_heads=max(1, args.d_model // 128), max_seq_len=args.max_seq_len,
    )
    ours = Transformer(cfg).eval()
    hf_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_engine_")) / "hf"
    export_hf(ours, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return ours, hf


def hf_generate(hf, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(
            idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            use_cache=True, pad_token_id=0, eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def greedy(n: int):
    from inference.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def bench_decode(args, ours, hf, rand) -> None:
    from inference.engine import LLMEngine

    N = args.new_tokens
    engine = LLMEngine(ours, max_model_len=args.max_seq_len)
    prompt = rand(32)
    agree = engine.generate([prompt], greedy(N))[0].outputs[0].token_ids == hf_generate(hf, prompt, N)

    def ours_run(n: int) -> None:
        engine.bm.reset_prefix_cache()  # the same work every repeat
        engine.generate([prompt], greedy(n))

    t = interleaved_medians(
        {
            "ours_n": lambda: ours_run(N), "ours_1": lambda: ours_run(1),
            "hf_n": lambda: hf_generate(hf, prompt, N), "hf_1": lambda: hf_generate(hf, prompt, 1),
        },
        max(5, 3 * args.repeats),
    )
    t_ours, t_hf = (t["ours_n"] - t["ours_1"]) / (N - 1), (t["hf_n"] - t["hf_1"]) / (N - 1)
    print(f"[1] batch-1 decode: ours {1 / t_ours:8.1f} tok/s   HF generate {1 / t_hf:8.1f} tok/s   "
          f"ratio {t_hf / t_ours:.2f}x   (greedy outputs agree: {agree})")


def bench_throughput(args, ours, hf, rand, g) -> None:
    from inference.engine import LLMEngine

    N = args.new_tokens
    engine = LLMEngine(ours, max_num_seqs=args.num_prompts, max_model_len=args.max_seq_len)
    prompts = [rand(int(n)) for n in torch.randint(16, 129, (args.num_prompts,), generator=g)]

    def ours_batch():
        engine.bm.reset_prefix_cache()
        return engine.generate(prompts, greedy(N))

    outs = ours_batch()
    t_ours = best_time(ours_batch, args.repeats)
    hf_outs = []
    t = time.perf_counter()
    for pr in prompts:
        hf_outs.append(hf_generate(hf, pr, N))
    t_hf = time.perf_counter() - t
    same = sum(o.outputs[0].token_ids == h for o, h in zip(outs, hf_outs))
    total = N * len(prompts)
    print(f"[2] {len(prompts)} prompts x {N} tokens: ours {total / t_ours:8.1f} tok/s   sequential HF {total / t_hf:8.1f} tok/s   "
          f"ratio {t_hf / t_ours:.2f}x   (greedy outputs agree: {same}/{len(prompts)})")


def bench_prefix(args, ours, rand) -> None:
    """8 requests = a shared system prompt + a short question, 8 new tokens each."""
    from inference.engine import LLMEngine

    system = rand(args.system_prompt)
    reqs = [system + rand(16) for _ in range(8)]
    warm = LLMEngine(ours, max_model_len=args.max_seq_len, enable_prefix_caching=True)
    cold = LLMEngine(ours, max_model_len=args.max_seq_len, enable_prefix_caching=False)
    warm.generate([system + rand(3)], greedy(1))  # a first request caches the system prompt
    t_warm = best_time(lambda: warm.generate(reqs, greedy(8)), args.repeats)
    t_cold = best_time(lambda: cold.generate(reqs, greedy(8)), args.repeats)
    hit = warm.bm.prefix_hit_tokens / max(1, warm.bm.prefix_query_tokens)
    print(f"[3] prefix cache ({args.system_prompt}-token shared prompt, 8 requests): warm {t_warm * 1e3:7.1f} ms   "
          f"cache off {t_cold * 1e3:7.1f} ms   speedup {t_cold / t_warm:.2f}x   (prompt tokens from cache: {hit:.0%})")


def bench_prompt_logprobs(args, ours, rand) -> None:
    """lm-eval's MMLU requests: 4 questions x 4 answer letters, each prompt a 384-token shared
    few-shot prefix + a 48-token question + the letter. Fresh questions every run, so only the
    shared prefix (and, with the cache, a question's earlier letters) can be reused."""
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams

    shots = rand(384)

    def requests() -> list[list[int]]:
        return [q + [letter] for q in (shots + rand(48) for _ in range(4)) for letter in (30, 31, 32, 33)]

    warm = LLMEngine(ours, max_model_len=args.max_seq_len, enable_prefix_caching=True)
    cold = LLMEngine(ours, max_model_len=args.max_seq_len, enable_prefix_caching=False)
    warm.generate([shots + rand(3)], greedy(1))  # caches the shared prefix
    scored = SamplingParams(max_tokens=0, prompt_logprobs=1)
    t = interleaved_medians({
        "scored": lambda: warm.generate(requests(), scored), "warm": lambda: warm.generate(requests(), greedy(1)),
        "cold": lambda: cold.generate(requests(), greedy(1)),
    }, max(3, args.repeats))
    print(f"[4] prompt logprobs (16 prompts of 433 tokens, 384 shared): scored {t['scored'] * 1e3:7.1f} ms   "
          f"1 token with the cache {t['warm'] * 1e3:7.1f} ms (scored {t['scored'] / t['warm']:.2f}x)   "
          f"1 token, cache off {t['cold'] * 1e3:7.1f} ms (scored {t['scored'] / t['cold']:.2f}x)")


def baseline_engine_class(path: str):
    """LLMEngine of another checkout's ``inference/`` package, imported beside ours (over this
    checkout's model/ and utils/), so both engines run in one process on the same weights."""
    import importlib

    def ours_modules() -> dict:
        return {k: m for k, m in sys.modules.items() if k == "inference" or k.startswith("inference.")}

    saved = ours_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(pathlib.Path(path).resolve()))
    try:
        return importlib.import_module("inference.engine").LLMEngine
    finally:
        sys.path.pop(0)
        for name in ours_modules():
            del sys.modules[name]
        sys.modules.update(saved)


def bench_baseline(args, ours, rand, g) -> None:
    from inference.engine import LLMEngine

    Baseline = baseline_engine_class(args.baseline)
    N = args.new_tokens
    prompt = rand(32)
    prompts = [rand(int(n)) for n in torch.randint(16, 129, (args.num_prompts,), generator=g)]
    engines = {"ours": LLMEngine(ours, max_num_seqs=args.num_prompts, max_model_len=args.max_seq_len),
               "base": Baseline(ours, max_num_seqs=args.num_prompts, max_model_len=args.max_seq_len)}

    def run(name: str, batch: list[list[int]], n: int):
        engines[name].bm.reset_prefix_cache()  # the same work every repeat
        return [c.outputs[0].token_ids for c in engines[name].generate(batch, greedy(n))]

    same = run("ours", prompts, N) == run("base", prompts, N)
    fns = {f"{k}_{n}": (lambda k=k, n=n: run(k, [prompt], n)) for k in engines for n in (1, N)}
    fns.update({f"{k}_batch": (lambda k=k: run(k, prompts, N)) for k in engines})
    clock = time.process_time if args.cpu_time else time.perf_counter
    t = interleaved_medians(fns, max(5, 3 * args.repeats), clock)
    tok = {k: (N - 1) / (t[f"{k}_{N}"] - t[f"{k}_1"]) for k in engines}
    batch = {k: N * len(prompts) / t[f"{k}_batch"] for k in engines}
    print(f"[5] vs {args.baseline} ({'CPU' if args.cpu_time else 'wall'} time): batch-1 decode ours {tok['ours']:7.1f} tok/s  "
          f"baseline {tok['base']:7.1f} tok/s  ratio {tok['ours'] / tok['base']:.3f}x   {len(prompts)} prompts ours "
          f"{batch['ours']:7.1f} tok/s  baseline {batch['base']:7.1f} tok/s  ratio {batch['ours'] / batch['base']:.3f}x   "
          f"(outputs equal: {same})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--max_seq_len", type=int, default=1024)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--num_prompts", type=int, default=32)
    p.add_argument("--system_prompt", type=int, default=512, help="tokens shared by the prefix-cache requests")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides (0: torch default)")
    p.add_argument("--sections", default="1234", help="which measurements to run, e.g. 13")
    p.add_argument("--baseline", help="another checkout of this repository: time its engine against ours ([5])")
    p.add_argument("--cpu_time", action="store_true", help="[5]: this process's CPU time instead of wall time "
                   "(with --threads 1 on a shared machine: the waits for a core drop out)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, hf = build(args)
    print(f"model: d_model={args.d_model} n_layers={args.n_layers} vocab={args.vocab_size} "
          f"({ours.num_params() / 1e6:.1f}M params, fp32), torch threads={torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(5, args.vocab_size, (n,), generator=g).tolist()

    if "1" in args.sections:
        bench_decode(args, ours, hf, rand)
    if "2" in args.sections:
        bench_throughput(args, ours, hf, rand, g)
    if "3" in args.sections:
        bench_prefix(args, ours, rand)
    if "4" in args.sections:
        bench_prompt_logprobs(args, ours, rand)
    if args.baseline:
        bench_baseline(args, ours, rand, g)


if __name__ == "__main__":
    main_guard(main)
