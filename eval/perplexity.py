"""Perplexity and bits per byte of a held-out corpus, with a sliding window.

    python eval/perplexity.py --checkpoint runs/pretrain_tiny/final              # data/bins/pretrain/val.bin
    python eval/perplexity.py --checkpoint runs/pretrain_tiny/final --text_path heldout.jsonl stride=64

The corpus is one token stream, documents joined as the pretraining bins are ("doc <eos> doc
<eos> ..."): the val bin as it is (numpy memmap, tokenizer hash checked against its meta.json),
or --text_path (.jsonl with a "text" field per line, or a .txt file as one document) encoded
with the checkpoint's tokenizer. Each token after the first is scored exactly once, with as
much preceding context as the window allows (eval/scoring.py::sliding_windows: window input
tokens per forward, stride new tokens scored per forward; stride < window buys context with
compute). Reports mean NLL (nats/token), perplexity = exp(mean NLL), and bits per byte =
total NLL in bits / UTF-8 bytes of the scored text, which compares models with different
tokenizers. Writes out/eval/perplexity/perplexity_summary.json and perplexity_records.jsonl
(one line per document: its tokens, bytes and NLL share).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from eval.common import EvalRecipe, context_length, load_model_and_tokenizer, out_dir, parse_eval_args, summary_header
from eval.report import write_results
from eval.scoring import sliding_window_nll
from utils.cli import main_guard
from utils.errors import UserError

NAME = "perplexity"
BIN_HINT = "python data_pipeline/processing/build_pretrain_bins.py"


def read_texts(path: Path, limit: Optional[int]) -> list[str]:
    """Documents of a .jsonl ({"text": ...} per line) or .txt (one document) file."""
    if not path.is_file():
        raise UserError(f"text_path {path} does not exist; point it at a .jsonl (one {{\"text\": ...}} per line) or .txt file")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not JSON ({err}); expected one {{\"text\": ...}} object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path}:{line_no}: expected an object with a string \"text\" field")
            texts.append(row["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """doc <eos> doc <eos> ... as int64 token ids (the pretraining bins' layout)."""
    ids: list[int] = []
    for doc in tok.encode_batch(texts):
        ids += doc + [tok.eos_id]
    return np.asarray(ids, dtype=np.int64)


def open_bin(path: Path, tok, limit: Optional[int]) -> np.ndarray:
    """The tokens of a pretraining bin (memmap), cut after its `limit`-th document when given."""
    from data_pipeline.processing.binfile import check_tokenizer_hash, open_array, read_meta

    meta = read_meta(path.parent, BIN_HINT)
    split = path.stem
    try:
        count = meta["n_tokens"][split]
    except (KeyError, TypeError):
        raise UserError(f"{path.parent / 'meta.json'} has no n_tokens for split {split!r}; rebuild with {BIN_HINT}") from None
    check_tokenizer_hash(meta, tok.hash, str(path), BIN_HINT)
    tokens = open_array(path, meta["dtype"], count, BIN_HINT)
    if limit is not None:
        ends = np.flatnonzero(tokens == meta.get("eos_id", tok.eos_id))
        if len(ends) >= limit:
            tokens = tokens[: ends[limit - 1] + 1]
    return tokens


def documents(tokens: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """[(start, end)] of each document in a "doc <eos> doc <eos>" stream; end is past its EOS
    (a last document without EOS ends at the stream's end)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(a), int(b)) for a, b in zip(starts, ends) if b > a]


def utf8_bytes(tok, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text `ids` decode to; special tokens count 0 bytes."""
    return len(tok.decode(np.asarray(ids).tolist()).encode("utf-8"))


def perplexity_metrics(total_nll: float, n_tokens: int, n_bytes: int) -> dict:
    """mean NLL (nats/token), perplexity = exp(mean NLL), bits per byte = NLL / ln 2 / bytes."""
    mean = total_nll / n_tokens
    # exp overflows a float past 709 nats/token (a broken or untrained-on-this-text model): say inf
    return {"mean_nll": mean, "perplexity": math.exp(mean) if mean < 709.0 else math.inf,
            "bits_per_byte": total_nll / math.log(2) / n_bytes if n_bytes else None,
            "n_tokens": n_tokens, "n_bytes": n_bytes, "total_nll": total_nll}


def per_document(tok, tokens: np.ndarray, nll: np.ndarray) -> list[dict]:
    """One record per document: its scored tokens (its EOS included, the stream's first token
    excluded), UTF-8 bytes and NLL. Decoding per document never splits a multi-byte character."""
    records = []
    for i, (a, b) in enumerate(documents(tokens, tok.eos_id)):
        doc_nll = float(nll[max(a, 1) - 1 : b - 1].sum(dtype=np.float64))
        n = b - max(a, 1)
        n_bytes = utf8_bytes(tok, tokens[max(a, 1) : b])
        records.append({"doc": i, "n_tokens": n, "n_bytes": n_bytes, "nll": doc_nll,
                        "mean_nll": doc_nll / n if n else None})
    return records


def run(recipe: EvalRecipe, model: Optional[torch.nn.Module] = None, tok=None) -> dict:
    """Evaluate; returns the summary (also written to out_dir). Tests may pass model and tok."""
    started = time.time()
    if recipe.data_path:  # the eval sets' key: never silently score bin_path instead
        raise UserError(f"perplexity reads text_path (.jsonl/.txt) or bin_path, not data_path; pass "
                        f"--text_path {recipe.data_path}")
    if model is None or tok is None:
        model, tok = load_model_and_tokenizer(recipe)
    if recipe.text_path:
        data = Path(recipe.text_path)
        tokens = encode_stream(tok, read_texts(data, recipe.limit))
    else:
        data = Path(recipe.bin_path)
        tokens = open_bin(data, tok, recipe.limit)
    if len(tokens) < 2:
        raise UserError(f"{data} holds {len(tokens)} token(s); perplexity needs at least 2")
    if int(tokens.max()) >= model.cfg.vocab_size:
        raise UserError(f"{data} has token id {int(tokens.max())} >= the model's vocab_size {model.cfg.vocab_size}; "
                        "it was encoded with another tokenizer")
    ctx = context_length(model, recipe)
    window = recipe.window or ctx
    if window > ctx:
        raise UserError(f"window={window} exceeds the model's context of {ctx} tokens; lower window")
    stride = recipe.stride or max(1, window // 2)
    if stride > window:
        raise UserError(f"stride={stride} must be <= window={window}")

    nll = sliding_window_nll(model, tokens, window, stride, recipe.batch_size, recipe.progress)
    records = per_document(tok, np.asarray(tokens), nll)
    metrics = perplexity_metrics(float(nll.sum(dtype=np.float64)), len(nll), sum(r["n_bytes"] for r in records))
    summary = {**summary_header(NAME, recipe, started), **metrics, "data": str(data), "window": window,
               "stride": stride, "n_docs": len(records)}
    summary_path, _ = write_results(out_dir(recipe, NAME), NAME, summary, records)
    bpb = f"{metrics['bits_per_byte']:.4f}" if metrics["bits_per_byte"] is not None else "n/a"
    print(f"perplexity: {metrics['perplexity']:.3f} (mean NLL {metrics['mean_nll']:.4f} nats/token), "
          f"{bpb} bits/byte over {len(nll):,} tokens in {len(records)} docs, window {window} stride {stride} "
          f"-> {summary_path}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    run(parse_eval_args(NAME, "Sliding-window perplexity and bits per byte of held-out text.", argv))


if __name__ == "__main__":
    main_guard(main)
