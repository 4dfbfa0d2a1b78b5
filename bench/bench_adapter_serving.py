"""Serving an adapter checkpoint: merged into the base on load vs LoRA layers applied at run time.

    python bench/bench_adapter_serving.py [--d_model 256] [--n_layers 6] [--new_tokens 64] [--batch 8] [--threads 1]

The server, the chat CLI and eval load adapters through model/load.py, which merges them by
default (``merge=True``). This prints decode tokens/s of the engine, in the same run and
taking turns, for: the base model, the adapter merged (what is served), the adapter kept as
LoRA layers (``merge=False``), and a QLoRA adapter kept over its NF4 base. Greedy outputs of
merged and unmerged are checked to agree.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import tempfile
import time
from pathlib import Path

import torch

from utils.cli import main_guard


def make_adapter(base: Path, out: Path, qlora: bool) -> Path:
    """A rank-16 all-linear adapter with nonzero B over ``base`` (QLoRA: over its NF4 copy)."""
    from model.load import load_model
    from model.lora import LoRAConfig, apply_lora, lora_layers, save_adapter
    from model.quant import quantize_model

    model = load_model(base, train=True)
    quantized = quantize_model(model, "all-linear") if qlora else []
    apply_lora(model, "all-linear", r=16, alpha=32)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    return save_adapter(out, model, LoRAConfig(r=16, alpha=32), base_checkpoint=str(base), qlora=qlora, quantized=quantized)


def decode_rate(model, prompts, new_tokens: int) -> tuple[float, list]:
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams

    engine = LLMEngine(model, max_num_seqs=len(prompts))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t
    return len(prompts) * new_tokens / dt, [o.outputs[0].token_ids for o in outs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from model.config import ModelConfig
    from model.load import load_model
    from model.transformer import Transformer
    from utils.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=8, n_kv_heads=2,
                          max_seq_len=512)
        base = save_checkpoint(tmp / "base", Transformer(cfg))
        lora, qlora = make_adapter(base, tmp / "lora", False), make_adapter(base, tmp / "qlora", True)
        models = {"base": load_model(base), "lora merged (served)": load_model(lora),
                  "lora at run time": load_model(lora, merge=False), "qlora at run time (NF4 base)": load_model(qlora, merge=False)}
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(5, args.vocab, (int(n),), generator=g).tolist() for n in torch.randint(16, 64, (args.batch,), generator=g)]
        rates = {k: [] for k in models}
        tokens = {}
        for _ in range(args.repeats):  # the variants take turns, so load changes hit them alike
            for name, model in models.items():
                rate, tokens[name] = decode_rate(model, prompts, args.new_tokens)
                rates[name].append(rate)
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        print(f"model d_model={args.d_model} n_layers={args.n_layers} vocab={args.vocab}; {args.batch} prompts x "
              f"{args.new_tokens} tokens, greedy; torch threads {args.threads}; median of {args.repeats}")
        for name, r in med.items():
            print(f"  {name:32s} {r:8.1f} tok/s   {r / med['lora merged (served)']:.2f}x of merged")
        same = sum(a == b for a, b in zip(tokens["lora merged (served)"], tokens["lora at run time"]))
        print(f"greedy tokens, merged vs at run time: {same}/{args.batch} sequences identical")


if __name__ == "__main__":
    main_guard(main)
