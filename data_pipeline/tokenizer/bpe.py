"""Byte-level BPE from scratch (GPT-2 style), merge-for-merge equal to the HF ``tokenizers`` trainer.

Pipeline, as in GPT-2:
  1. pre-tokenize: split text with the GPT-2 regex ('s, words with their
     leading space, numbers, punctuation runs, whitespace runs);
  2. map every UTF-8 byte of a piece to one printable character
     (``bytes_to_unicode``), so a piece is a string over a 256-symbol alphabet;
  3. BPE: start from the 256 byte symbols and repeatedly merge the most frequent
     adjacent pair into a new symbol until the vocabulary is full.

Training keeps pair counts up to date incrementally: merging a pair only
touches the words that contain it, and each merge reports the pair-count
changes around it (never a full recount). It reproduces the HF
``BpeTrainer`` exactly, including its details:
  * ids: special tokens first, then the 256 byte symbols sorted by code point;
  * the heap pops the highest count, ties broken by the smallest (id_a, id_b);
  * a heap entry carries the set of words it was created for and merges only
    there (a pair may have several entries; a later one re-adds the same
    merge, and the saved merge keeps its last rank), stale counts are
    refreshed lazily on pop, and a merge never decrements its own pair.
Encoding applies merges like HF's ``Word::merge_all``: lowest rank first, then
leftmost position. Decoding maps symbols back to bytes and decodes UTF-8 with
replacement characters for partial sequences (like HF's ByteLevel decoder).
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex

from utils.fs import atomic_path
from utils.errors import UserError

# The GPT-2 pre-tokenization regex (same string as HF's ByteLevel pre-tokenizer).
# Note: the ``regex`` module and HF's Oniguruma ship different Unicode versions;
# splits agree on every character assigned in Python's ``unicodedata`` table
# (checked over all code points), and may differ on ones assigned later.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printables map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_BYTE_TABLE = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})


def pretokenize(text: str) -> list[str]:
    """Split ``text`` with the GPT-2 regex and map each piece to byte-level characters."""
    return [piece.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)
            for piece in GPT2_PATTERN.findall(text)]


def count_words(texts: Iterable[str]) -> Counter:
    """Byte-level word -> number of occurrences over all ``texts``."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    return counts


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[tuple[tuple[int, int], int]]:
    """Merge every (a, b) in ``word`` in place, left to right; return the pair-count changes.

    Like HF ``Word::merge``: for each merge, the pairs with the left and right
    neighbours lose one and the pairs with the new symbol gain one; the merged
    pair itself is not reported.
    """
    changes = []
    i = 0
    while i < len(word) - 1:
        if word[i] == a and word[i + 1] == b:
            if i > 0:
                changes.append(((word[i - 1], a), -1))
                changes.append(((word[i - 1], new), 1))
            word[i:i + 2] = [new]
            if i < len(word) - 1:
                changes.append(((b, word[i + 1]), -1))
                changes.append(((new, word[i + 1]), 1))
        i += 1
    return changes


def train_bpe(word_counts: dict[str, int], vocab_size: int,
              special_tokens: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn a byte-level BPE vocabulary.

    Args: word_counts maps byte-level words (from ``count_words``) to counts;
    vocab_size counts the special tokens and the 256 byte symbols.
    Returns: (vocab, merges): vocab[i] is the string of token id i; merges are
    (left, right) strings in rank order.
    """
    vocab = list(special_tokens) + sorted(BYTE_TO_CHAR.values(), key=ord)
    token_id = {t: i for i, t in enumerate(vocab)}
    words = [[token_id[c] for c in w] for w in word_counts]
    counts = list(word_counts.values())

    # Initial pair counts and, per pair, the words that contain it.
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, w in enumerate(words):
        for pair in itertools.pairwise(w):
            pair_counts[pair] = pair_counts.get(pair, 0) + counts[wi]
            where.setdefault(pair, set()).add(wi)
    # Max-heap via negated counts; ties: smallest pair first; entry ids keep pos sets apart.
    heap, positions = [], {}
    for pair, pos in where.items():
        if pair_counts[pair] > 0:
            positions[len(positions)] = pos
            heap.append((-pair_counts[pair], pair, len(positions) - 1))
    heapq.heapify(heap)
    next_entry = len(positions)

    merges: list[tuple[tuple[int, int], int]] = []
    while len(token_id) < vocab_size and heap:
        neg_count, pair, entry = heapq.heappop(heap)
        if -neg_count != pair_counts[pair]:  # stale: refresh and retry later
            heapq.heappush(heap, (-pair_counts[pair], pair, entry))
            continue
        if pair_counts[pair] < 1:
            break
        new_token = vocab[pair[0]] + vocab[pair[1]]
        new_id = token_id.get(new_token)
        if new_id is None:  # two different pairs can spell the same token
            new_id = token_id[new_token] = len(vocab)
            vocab.append(new_token)
        merges.append((pair, new_id))

        updated: dict[tuple[int, int], set[int]] = {}
        for wi in positions.pop(entry):
            for changed, delta in _merge_word(words[wi], pair[0], pair[1], new_id):
                pair_counts[changed] = pair_counts.get(changed, 0) + delta * counts[wi]
                if delta > 0:
                    updated.setdefault(changed, set()).add(wi)
        for changed, pos in updated.items():
            if pair_counts[changed] > 0:
                positions[next_entry] = pos
                heapq.heappush(heap, (-pair_counts[changed], changed, next_entry))
                next_entry += 1

    # A pair merged twice keeps its last rank (HF stores merges in a map pair -> rank).
    last_rank = {pair: rank for rank, (pair, _) in enumerate(merges)}
    ordered = sorted(last_rank, key=last_rank.get)
    return vocab, [(vocab[a], vocab[b]) for a, b in ordered]


class ByteLevelBPE:
    """A byte-level BPE tokenizer: encode/decode, special tokens, tokenizer.json save/load.

    ``vocab[i]`` is token i as a byte-level string; ``merges`` are in rank order;
    special tokens are ordinary vocab entries that ``encode`` only produces when
    ``allow_special=True`` (then their exact text maps to their id).
    """

    def __init__(self, vocab: list[str], merges: list[tuple[str, str]], special_tokens: list[str]):
        self.vocab = list(vocab)
        self.token_id = {t: i for i, t in enumerate(self.vocab)}
        self.special_tokens = list(special_tokens)
        self.special_ids = {self.token_id[t] for t in special_tokens}
        # pair of ids -> (rank, id of the merged token)
        self.merges = {(self.token_id[a], self.token_id[b]): (rank, self.token_id[a + b])
                       for rank, (a, b) in enumerate(merges)}
        self.merge_list = list(merges)
        self._cache: dict[str, list[int]] = {}
        self._special_re = (regex.compile("|".join(regex.escape(t) for t in
                                                   sorted(special_tokens, key=len, reverse=True)))
                            if special_tokens else None)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> ByteLevelBPE:
        """Train on ``texts`` (see ``train_bpe``); raises UserError on a too small vocab."""
        if vocab_size < 256 + len(special_tokens):
            raise UserError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte "
                            f"tokens + {len(special_tokens)} special tokens; use --vocab_size >= "
                            f"{256 + len(special_tokens)}")
        vocab, merges = train_bpe(count_words(texts), vocab_size, special_tokens)
        return cls(vocab, merges, special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _encode_word(self, word: str) -> list[int]:
        """BPE on one byte-level piece: lowest merge rank first, then leftmost (HF order)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        sym = [self.token_id[c] for c in word]
        n = len(sym)
        nxt, prv, alive = list(range(1, n)) + [-1], list(range(-1, n - 1)), [True] * n
        heap = []
        for i in range(n - 1):
            m = self.merges.get((sym[i], sym[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            _, i, new_id = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j == -1:
                continue
            m = self.merges.get((sym[i], sym[j]))
            if m is None or m[1] != new_id:  # an expired entry
                continue
            sym[i], alive[j], nxt[i] = new_id, False, nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right != -1:
                    m = self.merges.get((sym[left], sym[right]))
                    if m is not None:
                        heapq.heappush(heap, (m[0], left, m[1]))
        out = [s for s, a in zip(sym, alive) if a]
        if len(self._cache) < 100_000:
            self._cache[word] = out
        return out

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no special tokens added). Special-token text is
        encoded as plain text unless ``allow_special``."""
        if allow_special and self._special_re is not None:
            ids, start = [], 0
            for m in self._special_re.finditer(text):
                ids += self.encode(text[start:m.start()])
                ids.append(self.token_id[m.group()])
                start = m.end()
            return ids + self.encode(text[start:])
        ids: list[int] = []
        for word in pretokenize(text):
            ids += self._encode_word(word)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD."""
        out, buf = [], bytearray()
        for i in ids:
            if i in self.special_ids:
                if skip_special_tokens:
                    continue
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(self.vocab[i])
                buf = bytearray()
            else:
                buf += bytes(CHAR_TO_BYTE[c] for c in self.vocab[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    # --- tokenizer.json (HF tokenizers format) -----------------------------
    def to_hf_dict(self) -> dict:
        """The HF ``tokenizers`` JSON for this tokenizer (ByteLevel pre-tokenizer/decoder, BPE)."""
        added = [{"id": self.token_id[t], "content": t, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True} for t in self.special_tokens]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": False, "vocab": self.token_id,
                 "merges": [[a, b] for a, b in self.merge_list]}
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
                "decoder": dict(byte_level, add_prefix_space=True), "model": model}

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_hf_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ByteLevelBPE:
        """Read a byte-level BPE tokenizer.json (written by ``save`` or by HF tokenizers)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist; train one with "
                            "python data_pipeline/tokenizer/train_tokenizer.py")
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"{path} holds a {model.get('type')} model; expected a byte-level BPE")
        vocab = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        specials = [t["content"] for t in sorted(data.get("added_tokens", []), key=lambda t: t["id"])
                    if t.get("special")]
        return cls(vocab, merges, specials)
