"""Run a tokenizer-bound function over many items in worker processes, with a progress bar.

Each worker loads the tokenizer once; items travel in chunks; results come
back in input order. With one worker (or few items) everything runs in this
process, which is also what tests use.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TypeVar

from tqdm import tqdm

from data_pipeline.tokenizer.tokenizer import Tokenizer, load_tokenizer

T = TypeVar("T")
R = TypeVar("R")
_TOKENIZER: Tokenizer | None = None


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path)


def _run_chunk(fn: Callable, chunk: list) -> list:
    return fn(_TOKENIZER, chunk)


def parallel_imap(fn: Callable[[Tokenizer, list[T]], list[R]], items: Sequence[T], tokenizer_path: str,
                  num_workers: int | None = None, desc: str = "encode", chunk_size: int = 512) -> Iterator[R]:
    """Yield ``fn(tok, chunk)``'s results over chunks of ``items``, in input order.

    ``fn`` must be a module-level function (it is pickled to the workers) that
    maps a list of items to a list of results of the same length. Results stream
    out as chunks finish, so a caller can write them without holding them all.
    """
    num_workers = default_workers() if num_workers is None else max(1, num_workers)
    chunks = (list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size))
    bar = tqdm(total=len(items), desc=desc, unit="doc", disable=None, leave=False)
    try:
        if num_workers == 1 or len(items) <= chunk_size:
            tok = load_tokenizer(tokenizer_path)
            for chunk in chunks:
                yield from fn(tok, chunk)
                bar.update(len(chunk))
            return
        # Each worker encodes single-threaded; the processes are the parallelism. Setting this
        # before the fork also keeps tokenizers from warning about (and disabling) its thread
        # pool in the children. Fork starts fast and needs no `__main__` guard in the caller.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(num_workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            for result in pool.imap(partial(_run_chunk, fn), chunks):
                yield from result
                bar.update(len(result))
    finally:
        bar.close()


def parallel_map(fn: Callable[[Tokenizer, list[T]], list[R]], items: Sequence[T], tokenizer_path: str,
                 num_workers: int | None = None, desc: str = "encode", chunk_size: int = 512) -> list[R]:
    """``list(parallel_imap(...))``: all results, in input order."""
    return list(parallel_imap(fn, items, tokenizer_path, num_workers, desc, chunk_size))
