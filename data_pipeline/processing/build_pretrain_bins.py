"""Pack the encoded stories into the pretraining bins: data/bins/pretrain/{train,val}.bin + meta.json.

    python data_pipeline/processing/build_pretrain_bins.py

Documents are shuffled (--seed) and each one is followed by <|endoftext|>, so
the stream reads doc EOS doc EOS ...; the loader samples random windows from it.
meta.json: {"format": "pretrain", "dtype": "uint16"|"uint32", "vocab_size",
"eos_id", "tokenizer_hash", "n_tokens": {"train", "val"}, "n_docs": {...}, ...}.
Fails (UserError) when the encoded stories were made by another tokenizer.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import time

import numpy as np

from utils.fs import atomic_dir
from data_pipeline.cli import add_tokenizer_arg, base_parser, open_tokenizer
from data_pipeline.paths import DataPaths
from data_pipeline.processing.binfile import (
    check_tokenizer_hash,
    open_array,
    read_meta,
    token_dtype,
    write_arrays,
    write_meta,
)
from utils.cli import main_guard
from utils.errors import UserError

ENCODE_HINT = "python data_pipeline/processing/encode_stories.py"


def packed_docs(tokens: np.ndarray, offsets: np.ndarray, order: np.ndarray, eos: int):
    """Yield doc, [eos], doc, [eos], ... for the documents in ``order``."""
    sep = np.array([eos], dtype=np.int64)
    for i in order:
        yield tokens[offsets[i]:offsets[i + 1]]
        yield sep


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--max_train_tokens", type=int, default=None, help="cap the train bin (whole docs)")
    add_tokenizer_arg(p)
    args = p.parse_args()
    paths = DataPaths.of(args.data_dir)
    tok = open_tokenizer(args, paths.tokenizer_json)
    src = read_meta(paths.tokens_stories, ENCODE_HINT)
    check_tokenizer_hash(src, tok.hash, str(paths.tokens_stories), ENCODE_HINT)

    t0 = time.time()
    dtype = token_dtype(tok.vocab_size)
    meta = {"format": "pretrain", "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "tokenizer_hash": tok.hash, "tokenizer_path": str(tok.path), "seed": args.seed,
            "separator": "eos_after_each_doc", "n_tokens": {}, "n_docs": {}, "source": str(paths.tokens_stories)}
    rng = np.random.default_rng(args.seed)
    with atomic_dir(paths.bins_pretrain) as tmp:
        for split in ("train", "val"):
            n_docs = src["n_docs"][split]
            tokens = open_array(paths.tokens_stories / f"{split}.bin", src["dtype"], src["n_tokens"][split], ENCODE_HINT)
            offsets = np.load(paths.tokens_stories / f"{split}.offsets.npy")
            if offsets.shape != (n_docs + 1,) or offsets[-1] != tokens.size:
                raise UserError(f"{paths.tokens_stories / f'{split}.offsets.npy'} does not match its "
                                f"meta.json (corrupted?); re-run {ENCODE_HINT}")
            order = rng.permutation(n_docs)
            if split == "train" and args.max_train_tokens is not None:  # keep whole docs under the cap
                lengths = np.diff(offsets)[order] + 1
                order = order[:int(np.searchsorted(np.cumsum(lengths), args.max_train_tokens, side="right"))]
            n = write_arrays(tmp / f"{split}.bin", packed_docs(tokens, offsets, order, tok.eos_id), dtype)
            meta["n_tokens"][split], meta["n_docs"][split] = n, len(order)
        write_meta(tmp, meta)
    print(f"pretrain bins: train {meta['n_tokens']['train']:,} tokens ({meta['n_docs']['train']} docs), "
          f"val {meta['n_tokens']['val']:,} tokens, {dtype.name}, in {time.time() - t0:.1f}s -> {paths.bins_pretrain}")


if __name__ == "__main__":
    main_guard(main)
