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


from data_pipeline.cli import add_tokenizer_arg, add_workers_arg, base_parser, open_tokenizer
from data_pipeline.paths import DataPaths
from data_pipeline.processing.chat_bins import build_chat_bins, layout_examples, render_sft_chunk, sft_meta
from utils.cli import main_guard


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_workers_arg(p)
    add_tokenizer_arg(p)
    args = p.parse_args()
    paths = DataPaths.of(args.data_dir)
    tok = open_tokenizer(args, paths.tokenizer_json)
    t0 = time.time()
    meta = sft_meta(tok)
    build_chat_bins(paths.bins_sft, paths.sft_raw, tok, args.num_workers, meta, render_chunk=render_sft_chunk,
                    layout=layout_examples, item="conversation", count_key="n_examples")
    print(f"sft bins: train {meta['n_examples']['train']} examples / {meta['n_tokens']['train']:,} tokens "
          f"({meta['n_assistant_tokens']['train']:,} assistant), val {meta['n_examples']['val']}, "
          f"max len {meta['max_example_len']['train']}, in {time.time() - t0:.1f}s -> {paths.bins_sft}")


if __name__ == "__main__":
    main_guard(main)
