"""Near-duplicate removal with MinHash + LSH.

A document becomes the set of hashes of its word 5-grams (shingles). The
MinHash signature keeps, for each of ``num_perm`` random hash functions h_i,
the minimum over the shingles; two documents
agree on a signature slot with probability equal to their Jaccard similarity.
LSH cuts the signature into ``bands`` bands of ``rows`` rows: documents that
share any whole band become candidates (probability 1 - (1 - J^rows)^bands),
and a candidate is a duplicate when the estimated Jaccard reaches
``threshold``. The first document of a group is kept.
"""
from __future__ import annotations

import re
import zlib
from collections import defaultdict

import numpy as np

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for the rolling n-gram hash


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Unique 32-bit hashes (as uint64) of the lowercased word n-grams of ``text``.

    Words are hashed once (crc32), then each n-gram hash is a polynomial of its
    word hashes, computed for all positions at once (uint64 arithmetic wraps).
    """
    words = _WORD.findall(text.lower())
    w = np.fromiter((zlib.crc32(x.encode("utf-8")) for x in words), dtype=np.uint64, count=len(words))
    if w.size == 0:
        return w
    k = min(ngram, w.size)
    h = np.zeros(w.size - k + 1, dtype=np.uint64)
    for j in range(k):
        h = h * _MIX + w[j:w.size - k + 1 + j]
    return np.unique(h >> np.uint64(32))


class MinHasher:
    """MinHash signatures with ``num_perm`` hash functions drawn from ``seed``.

    h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 with odd a_i (multiply-shift
    hashing: a universal family with no division).
    """

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """(num_perm,) uint32: the minimum over shingles of each hash function."""
        if hashes.size == 0:
            return np.zeros(self.a.shape, dtype=np.uint32)
        values = (self.a[:, None] * hashes[None, :] + self.b[:, None]) >> np.uint64(32)
        return values.min(axis=1).astype(np.uint32)


def near_duplicate_mask(texts: list[str], threshold: float = 0.8, num_perm: int = 128,
                        bands: int = 16, ngram: int = 5, seed: int = 0) -> list[bool]:
    """keep[i] is False when texts[i] nearly duplicates an earlier kept text.

    Default 16 bands x 8 rows: pairs at Jaccard 0.8 become candidates with
    probability 0.9996, pairs at 0.4 with 0.01.
    """
    if num_perm % bands:
        raise ValueError("num_perm must be a multiple of bands")
    rows = num_perm // bands
    hasher = MinHasher(num_perm, seed)
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
    signatures = np.zeros((len(texts), num_perm), dtype=np.uint32)
    keep = []
    for i, text in enumerate(texts):
        sig = signatures[i] = hasher.signature(shingle_hashes(text, ngram))
        keys = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]
        candidates = set()
        for b, k in enumerate(keys):
            candidates.update(buckets[b].get(k, ()))
        duplicate = False
        if candidates:
            cand = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            duplicate = bool(((signatures[cand] == sig).mean(axis=1) >= threshold).any())
        keep.append(not duplicate)
        if not duplicate:
            for b, k in enumerate(keys):
                buckets[b][k].append(i)
    return keep
