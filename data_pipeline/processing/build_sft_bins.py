"""Render the SFT conversations with THE chat template into bins with a loss mask: data/bins/sft/.

    python data_pipeline/processing/build_sft_bins.py

Reads data/raw/sft_{train,val}.jsonl; renders each conversation with
``chat_template.render_chat`` in parallel. Writes per split:
  {split}.bin       token ids (uint16/uint32), examples back to back
  {split}.mask.bin  uint8, 1 where the token is assistant content or its <|im_end|>
  {split}.idx.npy   int64 (n_examples,), start offset of each example
and meta.json {"format": "sft", "dtype", "pad_id", "tokenizer_hash", "n_tokens",
"n_examples", "n_assistant_tokens", ...}. Conversations that fail validation
(bad role, no assistant turn) are skipped and counted; none valid is a UserError.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import time

import numpy as np

from data_pipeline.cli import add_workers_arg, base_parser
from data_pipeline.paths import DataPaths
from data_pipeline.processing.binfile import token_dtype
from data_pipeline.processing.chat_bins import SplitArrays, build_chat_bins
from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.tokenizer.tokenizer import Tokenizer
from utils.cli import main_guard
from utils.errors import UserError


def render_chunk(tok: Tokenizer, rows: list[dict]) -> list:
    """Worker: (ids, mask) arrays per conversation, or an error string for a bad one."""
    out = []
    for row in rows:
        try:
            ids, mask = render_chat(tok, row.get("messages"))
        except UserError as err:
            out.append(str(err))
            continue
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)) if any(mask)
                   else "the conversation has no assistant message to learn")
    return out


def layout_examples(good: list) -> SplitArrays:
    """Conversations back to back; the index holds each one's start offset."""
    lengths = np.array([ids.size for ids, _ in good], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    counts = {"n_assistant_tokens": int(sum(int(m.sum()) for _, m in good)),
              "max_example_len": int(lengths.max()), "mean_example_len": round(float(lengths.mean()), 1)}
    return SplitArrays((ids for ids, _ in good), (m for _, m in good), starts, counts)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_workers_arg(p)
    args = p.parse_args()
    paths = DataPaths.of(args.data_dir)
    tok = Tokenizer.from_file(paths.tokenizer_json)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.time()
    meta = {"format": "sft", "dtype": dtype.name, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id, "im_end_id": tok.im_end_id,
            "tokenizer_hash": tok.hash, "tokenizer_path": str(tok.path),
            "chat_format": "data_pipeline.tokenizer.chat_template.render_chat"}
    build_chat_bins(paths.bins_sft, paths.sft_raw, tok, args.num_workers, meta, render_chunk=render_chunk,
                    layout=layout_examples, item="conversation", count_key="n_examples")
    print(f"sft bins: train {meta['n_examples']['train']} examples / {meta['n_tokens']['train']:,} tokens "
          f"({meta['n_assistant_tokens']['train']:,} assistant), val {meta['n_examples']['val']}, "
          f"max len {meta['max_example_len']['train']}, in {time.time() - t0:.1f}s -> {paths.bins_sft}")


if __name__ == "__main__":
    main_guard(main)
