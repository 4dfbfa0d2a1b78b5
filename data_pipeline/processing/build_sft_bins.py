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

from utils.fs import atomic_dir
from data_pipeline.cli import add_workers_arg, base_parser
from data_pipeline.jsonl import load_jsonl
from data_pipeline.paths import DataPaths
from data_pipeline.processing.binfile import token_dtype, write_arrays, write_meta
from data_pipeline.processing.parallel import parallel_map
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


def write_examples(folder, split: str, rendered: list, dtype) -> dict:
    """Write one split's tokens, mask and start offsets; return its counts."""
    good = [r for r in rendered if not isinstance(r, str)]
    errors = [r for r in rendered if isinstance(r, str)]
    if not good:
        raise UserError(f"no valid {split} conversation to build SFT bins from"
                        + (f" (first problem: {errors[0]})" if errors else " (the file is empty)"))
    lengths = np.array([ids.size for ids, _ in good], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = write_arrays(folder / f"{split}.bin", (ids for ids, _ in good), dtype)
    write_arrays(folder / f"{split}.mask.bin", (m for _, m in good), np.dtype(np.uint8))
    np.save(folder / f"{split}.idx.npy", starts)
    if errors:
        print(f"{split}: skipped {len(errors)} conversations (first problem: {errors[0]})")
    return {"n_tokens": n, "n_examples": len(good), "skipped": len(errors),
            "n_assistant_tokens": int(sum(int(m.sum()) for _, m in good)),
            "max_example_len": int(lengths.max()), "mean_example_len": round(float(lengths.mean()), 1)}


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
    with atomic_dir(paths.bins_sft) as tmp:
        for split in ("train", "val"):
            rows = load_jsonl(paths.sft_raw(split))
            rendered = parallel_map(render_chunk, rows, str(tok.path), args.num_workers, desc=f"render {split}")
            for key, value in write_examples(tmp, split, rendered, dtype).items():
                meta.setdefault(key, {})[split] = value
        write_meta(tmp, meta)
    print(f"sft bins: train {meta['n_examples']['train']} examples / {meta['n_tokens']['train']:,} tokens "
          f"({meta['n_assistant_tokens']['train']:,} assistant), val {meta['n_examples']['val']}, "
          f"max len {meta['max_example_len']['train']}, in {time.time() - t0:.1f}s -> {paths.bins_sft}")


if __name__ == "__main__":
    main_guard(main)
