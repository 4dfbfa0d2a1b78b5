"""Render the preference pairs with THE chat template into bins: data/bins/preference/.

    python data_pipeline/processing/build_preference_bins.py

Reads data/raw/preference_{train,val}.jsonl ({"prompt": [messages], "chosen",
"rejected"}). Each side is ``render_chat(prompt + [assistant reply])``; both
sides start with the same prompt tokens (``render_chat(prompt,
add_generation_prompt=True)``, checked). Layout per split:
  {split}.bin       token ids: chosen sequence then rejected sequence, pair after pair
  {split}.mask.bin  uint8, 1 on the final reply's tokens and its <|im_end|> only
                    (earlier assistant turns of a multi-turn prompt are 0)
  {split}.idx.npy   int64 (n_pairs, 5): chosen_start, chosen_len, rejected_start,
                    rejected_len, prompt_len
and meta.json {"format": "preference", "dtype", "pad_id", "tokenizer_hash",
"n_tokens", "n_pairs", ...}. Read it with ``data_pipeline.loader.PreferenceLoader``.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import time

import numpy as np

from data_pipeline.cli import add_tokenizer_arg, add_workers_arg, base_parser, open_tokenizer
from data_pipeline.paths import DataPaths
from data_pipeline.processing.binfile import token_dtype
from data_pipeline.processing.chat_bins import SplitArrays, build_chat_bins
from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.tokenizer.tokenizer import Tokenizer
from utils.cli import main_guard
from utils.errors import UserError


def render_pair(tok: Tokenizer, row: dict):
    """(chosen_ids, chosen_mask, rejected_ids, rejected_mask, prompt_len) or an error string."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "chosen and rejected must be strings (the assistant replies)"
    try:
        prompt_ids, _ = render_chat(tok, prompt, add_generation_prompt=True)
        if prompt[-1]["role"] != "user":
            return "the prompt must end with a user message"
        sides = []
        for reply in (chosen, rejected):
            ids, mask = render_chat(tok, prompt + [{"role": "assistant", "content": reply}])
            assert ids[:len(prompt_ids)] == prompt_ids, "render_chat must extend the prompt"
            mask = np.asarray(mask, dtype=np.uint8)
            mask[:len(prompt_ids)] = 0  # learn only the final reply
            sides += [np.asarray(ids, dtype=np.int64), mask]
    except UserError as err:
        return str(err)
    return (*sides, len(prompt_ids))


def render_chunk(tok: Tokenizer, rows: list[dict]) -> list:
    return [render_pair(tok, row) for row in rows]


def layout_pairs(good: list) -> SplitArrays:
    """Chosen then rejected sequence, pair after pair; the index row of a pair locates both sides."""
    index, offset = np.zeros((len(good), 5), dtype=np.int64), 0
    for i, (c_ids, _, r_ids, _, prompt_len) in enumerate(good):
        index[i] = (offset, c_ids.size, offset + c_ids.size, r_ids.size, prompt_len)
        offset += c_ids.size + r_ids.size
    longest = int(np.maximum(index[:, 1], index[:, 3]).max())
    return SplitArrays((a for g in good for a in (g[0], g[2])), (a for g in good for a in (g[1], g[3])), index,
                       {"max_seq_len": longest})


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_workers_arg(p)
    add_tokenizer_arg(p)
    args = p.parse_args()
    paths = DataPaths.of(args.data_dir)
    tok = open_tokenizer(args, paths.tokenizer_json)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.time()
    meta = {"format": "preference", "dtype": dtype.name, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
            "tokenizer_hash": tok.hash, "tokenizer_path": str(tok.path),
            "index_columns": ["chosen_start", "chosen_len", "rejected_start", "rejected_len", "prompt_len"],
            "chat_format": "data_pipeline.tokenizer.chat_template.render_chat"}
    build_chat_bins(paths.bins_preference, paths.preference_raw, tok, args.num_workers, meta, render_chunk=render_chunk,
                    layout=layout_pairs, item="preference pair", count_key="n_pairs")
    print(f"preference bins: train {meta['n_pairs']['train']} pairs / {meta['n_tokens']['train']:,} tokens, "
          f"val {meta['n_pairs']['val']}, longest {meta['max_seq_len']['train']} tokens, "
          f"in {time.time() - t0:.1f}s -> {paths.bins_preference}")


if __name__ == "__main__":
    main_guard(main)
