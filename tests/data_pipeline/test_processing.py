"""Data-quality steps (PII scrubbing, MinHash dedup), the safe file writing they rely on, and the
chat-format bin writing the SFT and preference builders share."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from utils.fs import atomic_dir, atomic_path
from data_pipeline.processing.binfile import open_array, token_dtype
from data_pipeline.processing.chat_bins import SplitArrays, build_chat_bins
from data_pipeline.processing.dedup import (
    MinHasher,
    near_duplicate_mask,
    shingle_hashes,
)
from data_pipeline.processing.pii import luhn_ok, scrub_pii
from data_pipeline.synthetic.stories import generate_story
from utils.errors import UserError


@pytest.mark.parametrize("text, expected, kind", [
    ("mail john.doe+x@mail.example.co.uk now", "mail [EMAIL] now", "email"),
    ("call (555) 123-4567 or 555.123.4567", "call [PHONE] or [PHONE]", "phone"),
    ("ring +44 20 7946 0958 today", "ring [PHONE] today", "phone"),
    ("host 10.0.0.255 up", "host [IP] up", "ip"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "v6 [IP]", "ip"),
    ("visa 4111-1111-1111-1111.", "visa [CARD].", "card"),
])
def test_scrub_pii_replaces_each_kind(text, expected, kind):
    out, counts = scrub_pii(text)
    assert out == expected and counts[kind] == expected.count("[") and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize("text", [
    "Tom has 5 + 3 = <<5+3=8>>8 apples.\n#### 8", "In 2023, 1234567 people and 12-4=8.",
    "version 1.2.3 and 999.1.1.1", "not a card 1234 5678 9012 3456", "pi is 3.14159265358979"])
def test_scrub_pii_keeps_ordinary_numbers(text):
    assert scrub_pii(text) == (text, {})


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713") and not luhn_ok("1234567890123456")


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    a = " ".join(rng.choice(words) for _ in range(300))
    b = a.split()
    for i in range(0, 300, 12):  # change 1 word in 12
        b[i] = "zzz"
    b = " ".join(b)
    ha, hb = shingle_hashes(a), shingle_hashes(b)
    true = len(np.intersect1d(ha, hb)) / len(np.union1d(ha, hb))
    hasher = MinHasher(256, seed=1)
    estimate = np.mean(hasher.signature(ha) == hasher.signature(hb))
    assert abs(estimate - true) < 0.08, (estimate, true)


def test_near_duplicates_removed_distinct_kept():
    rng = random.Random(1)
    stories = [generate_story(rng)[0] for _ in range(60)]
    near = stories[5].replace(".", "!", 1)  # one character changed
    texts = stories + [near, stories[7]]
    keep = near_duplicate_mask(texts, threshold=0.8)
    assert keep[:60] == [True] * 60 and keep[60:] == [False, False]
    assert near_duplicate_mask(["", "", "a b"]) == [True, False, True]


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32


def test_open_array_checks_size(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "a.bin")
    assert open_array(tmp_path / "a.bin", "uint16", 10, "x").sum() == 45
    with pytest.raises(UserError, match="truncated"):
        open_array(tmp_path / "a.bin", "uint16", 11, "x")
    with pytest.raises(UserError, match="does not exist"):
        open_array(tmp_path / "b.bin", "uint16", 1, "x")


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    folder = tmp_path / "bins"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("crash")
    assert (folder / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bins", "out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def render_rows(tok, rows: list[dict]) -> list:
    """A stand-in renderer: a row carries its ids and mask, or the error it should report."""
    return [r["error"] if "error" in r else (np.array(r["ids"]), np.array(r["mask"], dtype=np.uint8)) for r in rows]


def layout_rows(good: list) -> SplitArrays:
    longest = max(ids.size for ids, _ in good)
    return SplitArrays((ids for ids, _ in good), (m for _, m in good), np.arange(len(good)), {"longest": longest})


def test_chat_bins_write_each_split_count_skips_and_keep_meta_order(tmp_path, tokenizer, capsys):
    raw = {"train": [{"ids": [5, 6, 7], "mask": [0, 1, 1]}, {"error": "no assistant"}, {"ids": [8, 9], "mask": [1, 0]}],
           "val": [{"ids": [3], "mask": [1]}]}
    for split, rows in raw.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = build_chat_bins(tmp_path / "bins", lambda split: tmp_path / f"{split}.jsonl", tokenizer, 1, {"format": "toy"},
                           render_chunk=render_rows, layout=layout_rows, item="row", count_key="n_rows")
    out = tmp_path / "bins"
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == [5, 6, 7, 8, 9]
    assert np.fromfile(out / "train.mask.bin", dtype=np.uint8).tolist() == [0, 1, 1, 1, 0]
    assert np.load(out / "train.idx.npy").tolist() == [0, 1]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert list(meta) == ["format", "n_tokens", "n_rows", "skipped", "longest"]  # builder's fields, then counts
    assert meta["n_tokens"] == {"train": 5, "val": 1} and meta["skipped"] == {"train": 1, "val": 0}
    assert "train: skipped 1 rows (first problem: no assistant)" in capsys.readouterr().out


def test_chat_bins_without_a_valid_row_name_the_file_and_write_nothing(tmp_path, tokenizer):
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"error": "bad role"}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl: no valid row to build bins from \(first problem: bad role\)"):
        build_chat_bins(tmp_path / "bins", lambda split: tmp_path / f"{split}.jsonl", tokenizer, 1, {},
                        render_chunk=render_rows, layout=layout_rows, item="row", count_key="n_rows")
    assert not (tmp_path / "bins").exists()
