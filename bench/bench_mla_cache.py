"""Decode KV-cache bytes per token: MLA vs GQA / MHA / MQA at the same model size, one run.

    python bench/bench_mla_cache.py [--context 512] [--steps 32] [--dtype bf16]

All models share d_model 1024, 4 layers, 16 query heads of 64 channels. MLA uses DeepSeek-V2's
ratios (kv_lora_rank = 4 * head_dim, decoupled rope = head_dim / 2, q_lora_rank = 3 * head_dim);
GQA uses Llama-3's 4 query heads per KV head. Each model prefills ``context`` tokens and
decodes ``steps`` more through model.cache.KVCache; bytes/token is what the cache stores
(``KVCache.nbytes_per_token``), checked against the formula. Also times MLA's decode step
with the absorbed (latent-space) path against the naive one (expand every cached latent).
The same arithmetic is printed for the published DeepSeek-V3 and a GQA-8 model of its width.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import statistics
import time

import torch

from model.cache import KVCache
from model.config import ModelConfig
from model.mla import MLAttention
from model.transformer import Transformer
from utils.cli import main_guard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASE = dict(vocab_size=4096, d_model=1024, n_layers=4, n_heads=16, max_seq_len=2048, d_ff=2816)
HD = 64
MLA = dict(q_lora_rank=3 * HD, kv_lora_rank=4 * HD, qk_nope_head_dim=HD, qk_rope_head_dim=HD // 2, v_head_dim=HD)


def configs() -> dict[str, ModelConfig]:
    return {
        "MHA": ModelConfig(**BASE, n_kv_heads=16),
        "GQA-4": ModelConfig(**BASE, n_kv_heads=4),
        "MQA": ModelConfig(**BASE, n_kv_heads=1),
        "MLA": ModelConfig(**BASE, attention="mla", mla=MLA),
    }


def formula(cfg: ModelConfig, nbytes: int) -> int:
    if cfg.attention == "mla":
        return (cfg.mla["kv_lora_rank"] + cfg.mla["qk_rope_head_dim"]) * cfg.n_layers * nbytes
    return 2 * cfg.n_kv_heads * cfg.head_dim * cfg.n_layers * nbytes


@torch.no_grad()
def decode(model: Transformer, context: int, steps: int) -> tuple[KVCache, list[float]]:
    cache = KVCache(context + steps)
    idx = torch.randint(0, model.cfg.vocab_size, (1, context))
    nxt = model(idx, cache=cache)[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = model(nxt, cache=cache)[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return cache, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    nbytes = torch.tensor([], dtype=dtype).element_size()
    torch.manual_seed(0)
    print(f"d_model {BASE['d_model']}, {BASE['n_layers']} layers, {BASE['n_heads']} heads x {HD}, {args.dtype}, "
          f"context {args.context} + {args.steps} decode steps")
    per_token, results = {}, {}
    for name, cfg in configs().items():
        model = Transformer(cfg).to(dtype).eval()
        cache, times = decode(model, args.context, args.steps)
        measured = cache.nbytes_per_token()
        assert measured == formula(cfg, nbytes), (name, measured, formula(cfg, nbytes))
        per_token[name] = measured
        results[name] = model
        print(f"{name:6s} params {model.num_params() / 1e6:6.2f}M  cache {measured:6d} B/token "
              f"(= formula)  decode {1000 * statistics.median(times):6.2f} ms/token")
    for ref in ("GQA-4", "MHA"):
        print(f"ratio MLA / {ref}: {per_token['MLA'] / per_token[ref]:.3f}  ({per_token[ref] / per_token['MLA']:.2f}x smaller)")

    # Absorbed vs naive decode on the same MLA model and cache contents.
    mla = results["MLA"]
    timing = {}
    for path in ("naive", "absorbed"):
        MLAttention.path = path
        torch.manual_seed(1)
        _, times = decode(mla, args.context, args.steps)
        timing[path] = statistics.median(times)
    MLAttention.path = None
    print(f"MLA decode step at context {args.context}: naive {1000 * timing['naive']:.2f} ms, "
          f"absorbed {1000 * timing['absorbed']:.2f} ms ({timing['naive'] / timing['absorbed']:.2f}x)")

    # Published sizes, arithmetic only: DeepSeek-V3 (61 layers, kv_lora_rank 512, rope 64) vs
    # a GQA model of the same width (128 heads of 128 channels, 8 KV heads), bf16.
    v3 = (512 + 64) * 61 * 2
    gqa = 2 * 8 * 128 * 61 * 2
    mha = 2 * 128 * 128 * 61 * 2
    print(f"DeepSeek-V3 full size: MLA {v3} B/token vs GQA-8 {gqa} ({gqa / v3:.2f}x) vs MHA {mha} ({mha / v3:.1f}x)")


if __name__ == "__main__":
    main_guard(main)
