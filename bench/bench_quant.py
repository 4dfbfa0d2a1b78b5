"""Low-precision decode: the weight formats against HF ``generate`` (fp32) and the bandwidth wall.

    python bench/bench_quant.py [--sections kernels,decode,quality] [--checkpoint out/demo/runs/pretrain/final]

Batch-1 decode reads every weight once per token, so tokens/s is bounded by bytes of weights per
token / memory bandwidth. Three sections, each measured against a reference in the same run:

kernels  one token (and a 128-token prefill) against a model's worth of weight matrices (more bytes
         than the last-level cache), for every candidate matmul path of each format: GB/s of weight
         bytes read and speed against fp32 F.linear. The fp32 matrix-vector rate is the wall the
         decode rows are held against. Chosen paths are marked; the rest are the rejected ones.
decode   batch-1 decode tokens/s of a 156M-parameter Llama-style model (d 1024, 12 layers, vocab
         8192): HF generate fp32 vs our engine with weights full / bf16 / int8 / int4 (and int4 with
         a bf16 KV cache), (time to N tokens - time to 1) / (N - 1), the runs taking turns, medians.
         Each row also gives the share of the wall it reaches: bytes of weights per token / time
         per token / the fp32 matrix-vector bandwidth.
quality  with --checkpoint (e.g. the demo's pretrained model): per format, perplexity on the
         validation bin (eval/perplexity.py), the share of positions whose next-token argmax equals
         the full model's, and greedy agreement with it on 32 prompts (tokens before the first
         difference).
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import copy
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.bench_engine import hf_generate, interleaved_medians
from model.weight_formats import BF16Linear, Int4Linear, Int8Linear, apply_weight_format, linear_weight_bytes
from utils.cli import main_guard

FORMATS = ("full", "bf16", "int8", "int4")


# ----------------------------------------------------------------------------- kernels


def candidates(ws: list[torch.Tensor], group: int) -> dict:
    """name -> (bytes of weights, fn(x) running x through every matrix). ``*`` marks the chosen paths.
    (Also tried and dropped from the table: int4 unpacked and dequantized inside a torch.compile'd
    matrix-vector product, 0.04x fp32 on 4 matrices: inductor does not vectorize the nibble unpack.)"""
    out: dict = {}
    n = sum(w.numel() for w in ws)
    lin = [nn.Linear(w.shape[1], w.shape[0], bias=False) for w in ws]
    for layer, w in zip(lin, ws):
        layer.weight.data = w
    out["fp32 F.linear *"] = (4 * n, lambda x: [F.linear(x, w) for w in ws])
    bf = [BF16Linear(layer) for layer in lin]
    out["bf16 F.linear, bf16 inputs *"] = (2 * n, lambda x: [m(x) for m in bf])
    i8 = [Int8Linear(layer) for layer in lin]
    out["int8 Int8Linear: 1 token compiled matvec, more aten int8pack *"] = (n, lambda x: [m(x) for m in i8])
    out["int8 aten._weight_int8pack_mm, bf16 inputs"] = (n, lambda x: [torch.ops.aten._weight_int8pack_mm(
        x.bfloat16(), m.qweight, m.scale.bfloat16()) for m in i8])
    out["int8 aten._weight_int8pack_mm, fp32 inputs"] = (
        n, lambda x: [torch.ops.aten._weight_int8pack_mm(x, m.qweight, m.scale) for m in i8])
    try:
        from torch.ao.quantization import quantize_dynamic

        dyn = [quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8) for layer in lin]
        out["int8 W8A8 fbgemm dynamic (activations int8 too)"] = (n, lambda x: [m(x) for m in dyn])
    except Exception as err:  # noqa: BLE001 - a missing backend is a row, not a crash
        print(f"  fbgemm dynamic quantization unavailable: {err}")
    i4 = [Int4Linear(layer, group) for layer in lin]
    out[f"int4 aten._weight_int4pack_mm_for_cpu, bf16 inputs, group {group} *"] = (n // 2, lambda x: [m(x) for m in i4])
    out["int4 aten._weight_int4pack_mm_for_cpu, fp32 inputs"] = (
        n // 2, lambda x: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.packed, group, m.scales_and_zeros.float())
                           for m in i4])
    try:
        from model.quant import quantize_linear

        nf4 = [quantize_linear(copy.deepcopy(layer), torch.float32) for layer in lin]
        out["nf4 bitsandbytes Linear4bit (CPU backend)"] = (int(n * 0.516), lambda x: [m(x) for m in nf4])
    except Exception as err:  # noqa: BLE001
        print(f"  bitsandbytes NF4 unavailable: {err}")
    return out


def bench_kernels(args) -> float:
    """Prints the table; returns the fp32 matrix-vector bandwidth in GB/s (the wall)."""
    torch.manual_seed(0)
    K, N = 1024, 2752  # the 156M model's FFN shape; 48 of them ~ its 135M linear weights
    ws = [torch.randn(N, K) * 0.02 for _ in range(args.matrices)]
    cands = candidates(ws, args.group_size)
    rows = {}
    for M in (1, 128):
        x = torch.randn(M, K)
        fns = {name: (lambda f=f: f(x)) for name, (_, f) in cands.items()
               if M == 1 or rows[1][name] <= 2 * rows[1]["fp32 F.linear *"]}  # prefill: paths that decode fast
        for f in fns.values():  # warm-up (and compile)
            f()
        rows[M] = interleaved_medians(fns, args.repeats)
    wall = cands["fp32 F.linear *"][0] / rows[1]["fp32 F.linear *"] / 1e9
    print(f"[kernels] {args.matrices} matrices {N}x{K} ({sum(w.numel() for w in ws) / 1e6:.0f}M weights), "
          f"1 thread; '*' = the path the format uses")
    print(f"  {'candidate':58s} {'decode ms':>9s} {'GB/s':>6s} {'vs fp32':>7s} {'prefill-128 ms':>14s} {'vs fp32':>7s}")
    for name, (nbytes, _) in cands.items():
        t1, t128 = rows[1][name], rows[128].get(name)
        prefill = f"{t128 * 1e3:14.1f} {rows[128]['fp32 F.linear *'] / t128:6.2f}x" if t128 else f"{'-':>14s} {'-':>7s}"
        print(f"  {name:58s} {t1 * 1e3:9.2f} {nbytes / t1 / 1e9:6.1f} {rows[1]['fp32 F.linear *'] / t1:6.2f}x {prefill}")
    print(f"  wall: the fp32 matrix-vector rate, {wall:.1f} GB/s")
    return wall


def fp32_wall(repeats: int) -> float:
    ws = [torch.randn(2752, 1024) for _ in range(48)]
    x = torch.randn(1, 1024)
    t = interleaved_medians({"fp32": lambda: [F.linear(x, w) for w in ws]}, repeats)["fp32"]
    return sum(w.numel() * 4 for w in ws) / t / 1e9


# ----------------------------------------------------------------------------- decode


def bench_decode(args, wall: float) -> None:
    from transformers import AutoModelForCausalLM

    from bench.bench_engine import greedy
    from inference.engine import LLMEngine
    from model.config import ModelConfig
    from model.hf_interop import export_hf
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=8, max_seq_len=1024)
    base = Transformer(cfg).eval()
    hf_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_quant_")) / "hf"
    export_hf(base, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engines = {}
    for fmt in FORMATS:
        model = base if fmt == "full" else apply_weight_format(copy.deepcopy(base), fmt, args.group_size)
        engines[fmt] = LLMEngine(model, max_model_len=cfg.max_seq_len, max_num_seqs=1)
    engines["int4 + bf16 KV cache"] = LLMEngine(engines["int4"].model, max_model_len=cfg.max_seq_len, max_num_seqs=1,
                                               kv_cache_dtype=torch.bfloat16)
    N = args.new_tokens
    prompt = torch.randint(5, 8192, (32,), generator=torch.Generator().manual_seed(0)).tolist()

    def ours(engine, n):
        engine.bm.reset_prefix_cache()
        return engine.generate([prompt], greedy(n))[0].outputs[0].token_ids

    ref = hf_generate(hf, prompt, N)
    agree = {name: ours(e, N) == ref for name, e in engines.items()}
    fns = {"hf_n": lambda: hf_generate(hf, prompt, N), "hf_1": lambda: hf_generate(hf, prompt, 1)}
    for name, e in engines.items():
        fns[name + "_n"] = lambda e=e: ours(e, N)
        fns[name + "_1"] = lambda e=e: ours(e, 1)
    t = interleaved_medians(fns, args.repeats)
    per_tok = {k[:-2]: (t[k] - t[k[:-2] + "_1"]) / (N - 1) for k in t if k.endswith("_n")}
    hf_bytes = linear_weight_bytes(base)
    print(f"[decode] {base.num_params() / 1e6:.0f}M-parameter model, batch 1, {N} new tokens after a 32-token prompt, "
          f"1 thread; wall {wall:.1f} GB/s (fp32 matrix-vector)")
    print(f"  {'run':24s} {'tok/s':>7s} {'vs HF fp32':>10s} {'MB/token':>9s} {'GB/s':>6s} {'of wall':>7s}  greedy == HF fp32")
    for name, sec in per_tok.items():
        nbytes = hf_bytes if name in ("hf", "full") else linear_weight_bytes(engines[name].model)
        label = "HF generate fp32" if name == "hf" else f"ours {name}"
        print(f"  {label:24s} {1 / sec:7.1f} {per_tok['hf'] / sec:9.2f}x {nbytes / 1e6:9.0f} {nbytes / sec / 1e9:6.1f} "
              f"{nbytes / sec / 1e9 / wall:6.0%}   {'' if name == 'hf' else agree[name]}")


# ----------------------------------------------------------------------------- quality


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def bench_quality(args) -> None:
    from bench.bench_engine import greedy
    from eval.common import EvalRecipe
    from eval.perplexity import open_bin
    from eval.perplexity import run as perplexity
    from inference.engine import LLMEngine
    from model.load import load, load_tokenizer

    tokens = open_bin(pathlib.Path(args.val_bin), load_tokenizer(args.checkpoint), None)[: 32 * 256]
    windows = torch.as_tensor(tokens.astype("int64")).view(32, 256)
    prompts = [w[:16].tolist() for w in windows]
    print(f"[quality] {args.checkpoint}: perplexity on {args.val_bin} (first {args.ppl_limit} documents), top-1 over "
          f"{windows.numel()} positions, greedy: 32 prompts x {args.new_tokens} tokens; int4 group {args.group_size}")
    print(f"  {'weights':8s} {'perplexity':>10s} {'vs full':>8s} {'top-1 agree':>11s} {'greedy agree':>12s} {'identical':>9s}")
    ref = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            recipe = EvalRecipe(checkpoint=args.checkpoint, weights=fmt, group_size=args.group_size, bin_path=args.val_bin,
                                limit=args.ppl_limit, progress=False, out_dir=tmp, device="cpu")
            model, tok = load(args.checkpoint, device="cpu", weights=fmt, group_size=args.group_size)
            ppl = perplexity(recipe, model, tok)["perplexity"]
            with torch.inference_mode():
                top1 = model(windows).argmax(-1)
            outs = [c.outputs[0].token_ids for c in LLMEngine(model).generate(prompts, greedy(args.new_tokens))]
            if fmt == "full":
                ref = {"ppl": ppl, "top1": top1, "outs": outs}
            agree = (top1 == ref["top1"]).float().mean().item()
            prefix = sum(common_prefix(o, r) for o, r in zip(outs, ref["outs"])) / sum(map(len, ref["outs"]))
            same = sum(o == r for o, r in zip(outs, ref["outs"]))
            print(f"  {fmt:8s} {ppl:10.4f} {ppl / ref['ppl'] - 1:+8.2%} {agree:11.1%} {prefix:12.1%} {same:6d}/32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="kernels,decode", help="comma-separated: kernels, decode, quality")
    p.add_argument("--group_size", type=int, default=64, help="int4 (the 156M model's d_ff 2752 takes 64)")
    p.add_argument("--matrices", type=int, default=48)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint", default="out/demo/runs/pretrain/final")
    p.add_argument("--val_bin", default="data/bins/pretrain/val.bin")
    p.add_argument("--ppl_limit", type=int, default=200, help="validation documents for perplexity")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    wall = bench_kernels(args) if "kernels" in sections else None
    if "decode" in sections:
        bench_decode(args, wall or fp32_wall(args.repeats))
    if "quality" in sections:
        bench_quality(args)


if __name__ == "__main__":
    main_guard(main)
