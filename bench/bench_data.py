"""Data pipeline throughput: tokenizer training (HF vs scratch) and bin encoding, one run.

    python bench/bench_data.py [--mb 5] [--vocab_size 4096] [--workers 2] [--rounds 2]

Corpus: ``--mb`` MB of the synthetic default (stories + SFT chat text, in the
proportions train_tokenizer.py reads them), generated with seed 0; or, with
``--text_dir``, text files (more varied: the vocabulary fills up, the merge loop runs longer).
  1. HF tokenizers BpeTrainer (Rust, byte-level, configured as in train_tokenizer.py): MB/s.
  2. The from-scratch trainer (data_pipeline/tokenizer/bpe.py, pure Python) on the
     same texts: seconds and the ratio scratch / HF (aim: within 20x); also checks
     that both learned identical merges.
  3. Bin encoding throughput (MB/s) of the trained tokenizer: one process
     (encode_batch) and ``--workers`` processes (parallel_map, as encode_stories.py).
Timings are the median of ``--rounds``; wall seconds, CPU seconds in brackets
(the machine may be shared: the ratio is measured in the same run).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from data_pipeline.processing.encode_stories import encode_chunk
from data_pipeline.processing.parallel import parallel_map
from data_pipeline.synthetic import sft
from data_pipeline.synthetic.stories import generate_story
from data_pipeline.tokenizer.bpe import ByteLevelBPE
from data_pipeline.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer
from data_pipeline.tokenizer.tokenizer import hf_config_files  # noqa: E402
from data_pipeline.tokenizer.train_tokenizer import row_text, train_hf
from utils.cli import main_guard


def corpus(mb: float) -> list[str]:
    """~mb MB of synthetic text: stories, then chat conversations (about 55:45 like the default)."""
    rng = random.Random(0)
    texts, size, limit = [], 0, mb * 1e6
    while size < 0.55 * limit:
        texts.append(generate_story(rng)[0])
        size += len(texts[-1].encode("utf-8"))
    while size < limit:
        for conv in sft.generate_conversations(rng, 500, "sft"):
            texts.append(row_text(conv))
            size += len(texts[-1].encode("utf-8"))
    return texts


def text_files(folder: str, mb: float) -> list[str]:
    """~mb MB of .py/.md/.txt files under ``folder`` (a more varied corpus than the synthetic one)."""
    texts, size = [], 0
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix in (".py", ".md", ".txt") and path.is_file() and size < mb * 1e6:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
            size += len(texts[-1].encode("utf-8"))
    return texts


def timed(fn, rounds: int):
    """(result of the last call, median wall seconds, median CPU seconds of this process)."""
    walls, cpus, out = [], [], None
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return out, statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=5.0)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--text_dir", default=None, help="use .py/.md/.txt files under this folder instead")
    args = p.parse_args()

    texts = text_files(args.text_dir, args.mb) if args.text_dir else corpus(args.mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; corpus {mb:.2f} MB ({len(texts)} texts), vocab {args.vocab_size}")

    hf, hf_s, hf_cpu = timed(lambda: train_hf(texts, args.vocab_size, show_progress=False), args.rounds)
    print(f"HF BpeTrainer        {hf_s:7.2f} s [{hf_cpu:6.2f} cpu]  {mb / hf_s:6.2f} MB/s")
    scratch, sc_s, sc_cpu = timed(lambda: ByteLevelBPE.train(texts, args.vocab_size, SPECIAL_TOKENS), args.rounds)
    same = [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]] == scratch.merge_list
    print(f"scratch bpe.py       {sc_s:7.2f} s [{sc_cpu:6.2f} cpu]  {mb / sc_s:6.2f} MB/s  "
          f"ratio scratch/HF = {sc_s / hf_s:.1f}x (aim <= 20x); identical merges: {same}; "
          f"vocab {scratch.vocab_size}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        hf.save(str(path))
        hf_config_files(Path(tmp))
        tok = Tokenizer.from_file(path)
        ids, one_s, one_cpu = timed(lambda: tok.encode_batch(texts), args.rounds)
        n_tokens = sum(len(x) for x in ids)
        print(f"encode 1 process     {one_s:7.2f} s [{one_cpu:6.2f} cpu]  {mb / one_s:6.2f} MB/s  "
              f"({n_tokens / one_s / 1e6:.2f} M tokens/s, {mb * 1e6 / n_tokens:.2f} bytes/token)")
        _, par_s, _ = timed(lambda: parallel_map(encode_chunk, texts, str(path), args.workers, desc="bench"),
                            args.rounds)
        print(f"encode {args.workers} processes   {par_s:7.2f} s           {mb / par_s:6.2f} MB/s  "
              f"(parallel_map incl. worker start-up, as encode_stories.py)")


if __name__ == "__main__":
    main_guard(main)
