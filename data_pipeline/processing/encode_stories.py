"""Clean (optional) and tokenize the raw stories in parallel: data/tokens/stories/.

    python data_pipeline/processing/encode_stories.py [--dedup] [--scrub_pii]

Reads data/raw/stories_{train,val}.jsonl and data/tokenizer/tokenizer.json.
Optional cleaning, with counts printed and stored in meta.json:
  --scrub_pii  replace emails, phones, IPs, card numbers by [EMAIL] ... tags
  --dedup      drop near-duplicate stories (MinHash/LSH, Jaccard >= --dedup_threshold);
               val stories that repeat a train story are dropped too (no leakage)
Writes {split}.bin (token ids, no separators), {split}.offsets.npy (int64,
n_docs + 1 document boundaries) and meta.json; build_pretrain_bins.py packs them.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo root

import time
from collections import Counter

import numpy as np

from utils.fs import atomic_dir
from data_pipeline.cli import add_tokenizer_arg, add_workers_arg, base_parser, open_tokenizer
from data_pipeline.jsonl import iter_jsonl
from data_pipeline.paths import DataPaths
from data_pipeline.processing.binfile import token_dtype, write_arrays, write_meta
from data_pipeline.processing.dedup import near_duplicate_mask
from data_pipeline.processing.parallel import parallel_imap
from data_pipeline.processing.pii import scrub_pii
from data_pipeline.tokenizer.tokenizer import Tokenizer
from utils.cli import main_guard
from utils.errors import UserError


def encode_chunk(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Worker: token ids of each text as a uint32 array."""
    return [np.asarray(ids, dtype=np.uint32) for ids in tok.encode_batch(texts)]


def encode_to_bin(docs: list[str], tok: Tokenizer, num_workers: int | None, path, dtype,
                  split: str) -> tuple[int, np.ndarray]:
    """Encode ``docs`` in parallel, streaming the ids into ``path``.

    Returns (token count, int64 offsets of shape (n_docs + 1,) marking each document).
    """
    lengths: list[int] = []

    def stream():  # write each document as it comes back; keep only its length
        for ids in parallel_imap(encode_chunk, docs, str(tok.path), num_workers, desc=f"encode {split}"):
            lengths.append(ids.size)
            yield ids

    n_tokens = write_arrays(path, stream(), dtype)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return n_tokens, offsets


def read_stories(path) -> list[str]:
    return [row["text"] for row in iter_jsonl(path) if isinstance(row.get("text"), str) and row["text"].strip()]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_workers_arg(p)
    p.add_argument("--dedup", action="store_true", help="drop near-duplicate stories (MinHash/LSH)")
    p.add_argument("--dedup_threshold", type=float, default=0.8, help="Jaccard of word 5-grams")
    p.add_argument("--scrub_pii", action="store_true", help="replace emails/phones/IPs/cards by tags")
    add_tokenizer_arg(p)
    args = p.parse_args()
    paths = DataPaths.of(args.data_dir)
    tok = open_tokenizer(args, paths.tokenizer_json)

    texts = {split: read_stories(paths.stories(split)) for split in ("train", "val")}
    if not texts["train"]:
        raise UserError(f"{paths.stories('train')} has no stories (empty corpus); "
                        "re-run data_pipeline/download/download_tinystories.py")
    stats: dict = {"docs_in": {s: len(t) for s, t in texts.items()}}
    if args.scrub_pii:
        pii: Counter = Counter()
        for split, docs in texts.items():
            cleaned = []
            for doc in docs:
                doc, counts = scrub_pii(doc)
                cleaned.append(doc)
                pii.update(counts)
            texts[split] = cleaned
        stats["pii_replaced"] = dict(pii)
        print(f"scrub_pii: replaced {sum(pii.values())} spans" + (f" {dict(pii)}" if pii else ""))
    if args.dedup:
        t0 = time.time()
        both = texts["train"] + texts["val"]
        keep = near_duplicate_mask(both, threshold=args.dedup_threshold, seed=args.seed)
        n_train = len(texts["train"])
        texts = {"train": [d for d, k in zip(both[:n_train], keep[:n_train]) if k],
                 "val": [d for d, k in zip(both[n_train:], keep[n_train:]) if k]}
        removed = {s: stats["docs_in"][s] - len(texts[s]) for s in texts}
        stats["dedup_removed"] = removed
        print(f"dedup: removed {removed['train']} train + {removed['val']} val near-duplicates "
              f"(Jaccard >= {args.dedup_threshold}) in {time.time() - t0:.1f}s")

    dtype = token_dtype(tok.vocab_size)
    meta = {"format": "encoded-docs", "tokenizer_hash": tok.hash, "tokenizer_path": str(tok.path),
            "vocab_size": tok.vocab_size, "dtype": dtype.name, "n_tokens": {}, "n_docs": {}, **stats}
    t0 = time.time()
    with atomic_dir(paths.tokens_stories) as tmp:
        for split, docs in texts.items():
            n_tokens, offsets = encode_to_bin(docs, tok, args.num_workers, tmp / f"{split}.bin", dtype, split)
            meta["n_tokens"][split], meta["n_docs"][split] = n_tokens, len(offsets) - 1
            np.save(tmp / f"{split}.offsets.npy", offsets)
        write_meta(tmp, meta)
    mb = sum(len(d.encode("utf-8")) for docs in texts.values() for d in docs) / 1e6
    seconds = time.time() - t0
    print(f"encoded {meta['n_docs']['train']} + {meta['n_docs']['val']} stories: "
          f"{meta['n_tokens']['train']:,} + {meta['n_tokens']['val']:,} tokens in {seconds:.1f}s "
          f"({mb / max(seconds, 1e-9):.1f} MB/s) -> {paths.tokens_stories}")


if __name__ == "__main__":
    main_guard(main)
