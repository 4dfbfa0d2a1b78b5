"""Structured output's cost per token, and the grammar engines measured against each other.

    python bench/bench_grammar.py [--tokenizer data/tokenizer/tokenizer.json] [--threads 1]

1. Inside the engine's batched step: 8 concurrent requests through ``LLMEngine`` (a random-weight
   Llama-style model, d_model 256, 6 layers), each with a JSON schema (``response_format``'s path,
   llguidance) vs the same requests unconstrained; the extra milliseconds per generated token.
   The unconstrained run generates exactly as many tokens per request as the constrained one did, so
   both batches shrink the same way.
2. The mask, engine against engine: the token sequences the constrained run produced are replayed
   through llguidance, outlines-core and xgrammar (all from PyPI; xgrammar also wants
   apache-tvm-ffi, its runtime), timing what the
   engine needs per step: the set of allowed tokens as a (V,) bool tensor, then advancing by one
   token. Compile time of each schema is reported separately.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from utils.cli import main_guard

SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
     "required": ["name", "age", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]},
                                      "days": {"type": "array", "items": {"type": "object", "properties": {
                                          "t": {"type": "number"}, "rain": {"type": "boolean"}}, "required": ["t", "rain"],
                                          "additionalProperties": False}, "maxItems": 3}},
     "required": ["city", "unit", "days"], "additionalProperties": False},
]


def engine_overhead(tok, args) -> tuple[float, float, list[list[int]]]:
    """(ms per token unconstrained, ms per token constrained, the constrained outputs' token ids)."""
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2,
                                    max_seq_len=512)).eval()
    prompts = [tok.encode(f"Request {i}: answer in JSON.") for i in range(8)]
    times = {"plain": [], "json": []}
    outputs: list[list[int]] = []
    for r in range(args.repeats):
        lengths = None
        for kind in ("json", "plain"):  # the two take turns, so load hits both alike
            engine = LLMEngine(model, tokenizer=tok, max_num_seqs=8)
            if kind == "json":
                params = [SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=r * 100 + i,
                                         grammar={"json_schema": SCHEMAS[i % len(SCHEMAS)]}) for i in range(len(prompts))]
                engine.generate(prompts[:1], params[:1])  # compile the grammars outside the timing, as a server caches them
                engine.generate(prompts[1:3], params[1:3])
            else:  # the same lengths unconstrained: the same batch occupancy step by step
                params = [SamplingParams(max_tokens=n, temperature=1.0, seed=r * 100 + i, ignore_eos=True)
                          for i, n in enumerate(lengths)]
            t = time.perf_counter()
            outs = engine.generate(prompts, params)
            n = sum(len(c.outputs[0].token_ids) for c in outs)
            times[kind].append(1000 * (time.perf_counter() - t) / n)
            if kind == "json":
                lengths = [len(c.outputs[0].token_ids) for c in outs]
                if r == 0:
                    outputs = [c.outputs[0].token_ids for c in outs]
    return statistics.median(times["plain"]), statistics.median(times["json"]), outputs


def token_bytes(tok) -> dict[bytes, list[int]]:
    from inference.api_protocol import token_piece

    vocab: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i not in tok.special_ids:
            vocab.setdefault(bytes(token_piece(tok, i)[1]), []).append(i)
    return vocab


def replay_llguidance(tok, schema: dict, ids: list[int]) -> tuple[float, float]:
    from inference.grammar import compile_grammar

    t = time.perf_counter()
    m = compile_grammar(tok, {"json_schema": schema}).matcher()
    build = time.perf_counter() - t
    t = time.perf_counter()
    for tid in ids:
        m.allowed(tok.vocab_size)
        if not m.accept(tid):
            break
    return build, (time.perf_counter() - t) / max(len(ids), 1)


def replay_outlines(tok, vocab, schema: dict, ids: list[int]) -> tuple[float, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t = time.perf_counter()
    # outlines-core's JSON regexes allow free whitespace unless told: none, as llguidance is run here
    index = Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), Vocabulary(tok.eos_id, vocab))
    guide = Guide(index)
    build = time.perf_counter() - t
    t = time.perf_counter()
    for tid in ids:
        allowed = torch.zeros(tok.vocab_size, dtype=torch.bool)
        allowed[torch.tensor(guide.get_tokens(), dtype=torch.long)] = True
        if tid not in tok.chat_stop_ids:
            guide.advance(tid)
    return build, (time.perf_counter() - t) / max(len(ids), 1)


def replay_xgrammar(tok, schema: dict, ids: list[int]) -> tuple[float, float]:
    import xgrammar as xgr
    from inference.api_protocol import token_piece

    t = time.perf_counter()
    pieces = [b"" if i in tok.special_ids else bytes(token_piece(tok, i)[1]) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(pieces, vocab_type=xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=list(tok.chat_stop_ids))
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    shifts = torch.arange(32, dtype=torch.int32)
    build = time.perf_counter() - t
    t = time.perf_counter()
    for tid in ids:
        matcher.fill_next_token_bitmask(bitmask)
        allowed = ((bitmask[0].unsqueeze(1) >> shifts) & 1).flatten()[: tok.vocab_size].bool()  # noqa: F841
        if tid not in tok.chat_stop_ids and not matcher.accept_token(tid):
            break
    return build, (time.perf_counter() - t) / max(len(ids), 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: a small one trained here)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from data_pipeline.tokenizer.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer
        if path is None:
            from data_pipeline.tokenizer.train_tokenizer import train_hf

            texts = [f'{{"name": "item {i}", "value": {i * 37 % 1000}, "ok": true}} Once upon a time {i}' for i in range(3000)]
            path = Path(tmp) / "tokenizer.json"
            train_hf(texts, 2048, show_progress=False).save(str(path))
        tok = load_tokenizer(path)
        plain, constrained, outs = engine_overhead(tok, args)
        print(f"tokenizer {path} (vocab {tok.vocab_size}); torch threads {args.threads}; median of {args.repeats}")
        print(f"engine, 8 concurrent requests: {plain:.2f} ms/token unconstrained, {constrained:.2f} ms/token with a JSON "
              f"schema ({constrained - plain:+.2f} ms/token, {constrained / plain:.2f}x)")
        vocab = token_bytes(tok)
        rows = {"llguidance": [], "outlines-core": [], "xgrammar": []}
        for i, ids in enumerate(outs):
            schema = SCHEMAS[i % len(SCHEMAS)]
            rows["llguidance"].append(replay_llguidance(tok, schema, ids))
            rows["outlines-core"].append(replay_outlines(tok, vocab, schema, ids))
            rows["xgrammar"].append(replay_xgrammar(tok, schema, ids))
        for name, vals in rows.items():
            build = statistics.median(v[0] for v in vals) * 1000
            step = statistics.median(v[1] for v in vals) * 1000
            print(f"  {name:14s} compile {build:8.2f} ms/schema   mask + advance {step:7.3f} ms/token")


if __name__ == "__main__":
    main_guard(main)
