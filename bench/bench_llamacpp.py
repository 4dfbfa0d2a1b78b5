"""Our decode against llama.cpp (through llama-cpp-python) on the same weights and thread count.

    pip install -r requirements-bench.txt      # builds llama.cpp from source (cmake + a C++ compiler)
    python bench/bench_llamacpp.py [--checkpoint out/demo/runs/pretrain/final] [--threads 1]

Both sides get the same weights through the GGUF export (model/gguf_export.py), in one process.

1. greedy agreement at f32: the checkpoint exported as f32 GGUF; llama.cpp's greedy continuation of
   a few prompts (argmax of its logits, fed back token ids) against our engine's, token for token.
2. batch-1 decode tokens/s of the 156M-parameter model of bench/bench_quant.py (random weights, a
   tokenizer trained on the synthetic stories): llama.cpp f32 / bf16 / q8_0 / q4_0 against ours
   full / bf16 / int8 / int4, (time to N tokens - time to 1) / (N - 1), the runs taking turns, medians.
   The pairs store the same bytes per weight except q4_0 (4.5 bits: an f16 scale per 32) vs int4
   (4.25 bits at group 128: bf16 scale and zero per 128); bytes/token are printed.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import copy
import random
import tempfile

import numpy as np
import torch

from bench.bench_engine import greedy, interleaved_medians
from utils.cli import main_guard
from utils.errors import UserError

PAIRS = (("f32", "full"), ("bf16", "bf16"), ("q8_0", "int8"), ("q4_0", "int4"))


def llama(path: pathlib.Path, threads: int, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("bench/bench_llamacpp.py needs llama-cpp-python: pip install -r requirements-bench.txt "
                        "(a source build: cmake and a C++ compiler).") from None
    return Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512, verbose=False)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation: argmax of each step's logits, fed back as a token id."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while True:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        out.append(int(logits.argmax()))
        if len(out) == n:
            return out
        llm.eval([out[-1]])


def ours_greedy(engine, prompt: list[int], n: int) -> list[int]:
    engine.bm.reset_prefix_cache()
    return engine.generate([prompt], greedy(n))[0].outputs[0].token_ids


def check_greedy(args, work: pathlib.Path) -> None:
    from inference.engine import LLMEngine
    from model.gguf_export import export_gguf
    from model.load import load

    path = export_gguf(args.checkpoint, str(work / "ckpt_f32.gguf"), "f32")
    model, tok = load(args.checkpoint)
    llm = llama(path, args.threads, model.cfg.max_seq_len)
    engine = LLMEngine(model)
    texts = ["Once upon a time", "The little dog", "Mia found a", "One day, Tom went to the"]
    same = 0
    for text in texts:
        prompt = tok.encode(text)
        a, b = ours_greedy(engine, prompt, args.new_tokens), llama_greedy(llm, prompt, args.new_tokens)
        same += a == b
        print(f"  {text!r}: {'same' if a == b else f'differ at token {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)}'}"
              f" -> {tok.decode(a)!r}")
    tokenized = all(llm.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t) for t in texts)
    print(f"[1] greedy at f32, {args.checkpoint}: {same}/{len(texts)} prompts identical over {args.new_tokens} tokens; "
          f"llama.cpp tokenizes the prompts as we do: {tokenized}")


def bench_decode(args, work: pathlib.Path) -> None:
    from data_pipeline.synthetic.stories import generate_story
    from data_pipeline.tokenizer.tokenizer import load_tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from inference.engine import LLMEngine
    from model.config import ModelConfig
    from model.gguf_export import write_gguf
    from model.transformer import Transformer
    from model.weight_formats import apply_weight_format, linear_weight_bytes

    rng = random.Random(0)
    train_hf([generate_story(rng)[0] for _ in range(2000)], 8192, show_progress=False).save(str(work / "tok.json"))
    tok = load_tokenizer(work / "tok.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=8, max_seq_len=1024)
    base = Transformer(cfg).eval()
    prompt = torch.randint(5, tok.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    N, fns, info = args.new_tokens, {}, {}
    for gguf_type, fmt in PAIRS:
        path = write_gguf(base, tok, work / f"m_{gguf_type}.gguf", gguf_type)
        llm = llama(path, args.threads, 256)
        model = base if fmt == "full" else apply_weight_format(copy.deepcopy(base), fmt, args.group_size)
        engine = LLMEngine(model, max_model_len=256, max_num_seqs=1)
        info[gguf_type] = (path.stat().st_size, linear_weight_bytes(model), fmt)
        for who, run in (("llama.cpp " + gguf_type, lambda n, llm=llm: llama_greedy(llm, prompt, n)),
                         ("ours " + fmt, lambda n, e=engine: ours_greedy(e, prompt, n))):
            fns[who + "|n"], fns[who + "|1"] = (lambda r=run: r(N)), (lambda r=run: r(1))
    t = interleaved_medians(fns, args.repeats)
    rate = {k[:-2]: (N - 1) / (t[k] - t[k[:-2] + "|1"]) for k in t if k.endswith("|n")}
    print(f"[2] batch-1 decode, {base.num_params() / 1e6:.0f}M-parameter model, {N} new tokens after 32, "
          f"{args.threads} thread(s) both sides")
    print(f"  {'llama.cpp':10s} {'file MB':>8s} {'tok/s':>7s}   {'ours':6s} {'linear MB':>9s} {'tok/s':>7s}  ours / llama.cpp")
    for gguf_type, fmt in PAIRS:
        size, ours_bytes, _ = info[gguf_type]
        a, b = rate["llama.cpp " + gguf_type], rate["ours " + fmt]
        print(f"  {gguf_type:10s} {size / 1e6:8.0f} {a:7.1f}   {fmt:6s} {ours_bytes / 1e6:9.0f} {b:7.1f}  {b / a:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="out/demo/runs/pretrain/final", help="for the greedy check (llama family)")
    p.add_argument("--sections", default="12")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in args.sections:
            check_greedy(args, pathlib.Path(tmp))
        if "2" in args.sections:
            bench_decode(args, pathlib.Path(tmp))


if __name__ == "__main__":
    main_guard(main)
