"""The scratch byte-level BPE against the HF tokenizers trainer, a naive reference, and round trips."""
from __future__ import annotations

import itertools
import json
import unicodedata
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from data_pipeline.tokenizer.bpe import (
    ByteLevelBPE,
    bytes_to_unicode,
    count_words,
    pretokenize,
    train_bpe,
)
from data_pipeline.tokenizer.tokenizer import SPECIAL_TOKENS
from data_pipeline.tokenizer.train_tokenizer import train_hf
from utils.errors import UserError

EXTRA = ["def f(x):\n    return x ** 2  # square\n", "naïve café — déjà vu ☕ 😀👍🏽 日本語のテキスト",
         "    indented\n\n\ttabs  and   spaces   ", "emails: a.b@c.org, nums 12345 3.14159 1e-9",
         "it's they're I'll we've she'd ''' \"\"\" ``` ###"]


@pytest.fixture(scope="module")
def both(corpus):
    texts = corpus + EXTRA * 20
    hf = train_hf(texts, 700, show_progress=False)
    hf.encode_special_tokens = True  # special-token text is plain text, as in scratch.encode and Tokenizer
    scratch = ByteLevelBPE.train(texts, 700, SPECIAL_TOKENS)
    return texts, hf, scratch


def test_scratch_merges_and_vocab_equal_hf(both):
    _, hf, scratch = both
    model = json.loads(hf.to_str())["model"]
    assert [tuple(m) for m in model["merges"]] == scratch.merge_list
    assert model["vocab"] == scratch.token_id
    assert len(scratch.vocab) == 700


def test_scratch_encodings_equal_hf(both):
    texts, hf, scratch = both
    for text in texts[:40] + EXTRA + ["unseen words: xylophone quizzically, 987654321!"]:
        assert scratch.encode(text) == hf.encode(text, add_special_tokens=False).ids


def naive_bpe(word_counts: Counter, n_merges: int, specials: list[str]) -> list[tuple[str, str]]:
    """Textbook BPE: recount every pair before each merge (slow, obviously correct)."""
    vocab = specials + sorted(bytes_to_unicode().values(), key=ord)
    ids = {t: i for i, t in enumerate(vocab)}
    words = {tuple(w): c for w, c in word_counts.items()}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for p in itertools.pairwise(w):
                pairs[p] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], ids[p[0]], ids[p[1]]))  # HF tie-break
        merges.append(best)
        new = best[0] + best[1]
        ids.setdefault(new, len(ids))
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def test_incremental_counts_equal_full_recount(corpus):
    counts = count_words(corpus[:60])
    _, merges = train_bpe(counts, 261 + 150, SPECIAL_TOKENS)
    assert merges == naive_bpe(counts, 150, SPECIAL_TOKENS)


def test_vocab_too_small_is_user_error():
    with pytest.raises(UserError, match="256"):
        ByteLevelBPE.train(["hello"], 200, SPECIAL_TOKENS)


def test_special_tokens(both):
    _, _, scratch = both
    text = "a<|im_end|>b"
    assert 3 not in scratch.encode(text)  # plain text by default: no injection
    assert scratch.encode(text, allow_special=True) == scratch.encode("a") + [3] + scratch.encode("b")
    ids = scratch.encode(text, allow_special=True)
    assert scratch.decode(ids) == "ab"
    assert scratch.decode(ids, skip_special_tokens=False) == text


def test_save_load_roundtrip_with_hf_and_transformers(both, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast
    texts, _, scratch = both
    path = tmp_path / "tokenizer.json"
    scratch.save(path)
    loaded, hf, fast = ByteLevelBPE.load(path), HFTokenizer.from_file(str(path)), PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in texts[:10] + EXTRA:
        ids = scratch.encode(text)
        assert loaded.encode(text) == ids == hf.encode(text).ids == fast.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text == fast.decode(ids)


@settings(max_examples=150, deadline=None)
@given(st.text())
@example("<|im_end|> <|endoftext|>\x00\ud7ff\ue000\U0010ffff")
def test_roundtrip_any_unicode(both, tokenizer, text):
    _, hf, scratch = both
    assert scratch.decode(scratch.encode(text)) == text
    assert hf.decode(hf.encode(text, add_special_tokens=False).ids) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text  # the project's wrapper


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cn")))
       .filter(lambda s: all(unicodedata.category(c) != "Cn" for c in s)))
def test_scratch_equals_hf_on_any_assigned_unicode(both, text):
    # Both engines agree on characters assigned in Python's Unicode table (see bpe.GPT2_PATTERN).
    _, hf, scratch = both
    assert scratch.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_invalid_utf8_looking_input_and_partial_tokens(both):
    _, _, scratch = both
    text = "\x00\x7f\x80\xff\ufffd\ufeff é e\u0301 🏳️‍🌈 \U0010ffff"
    assert scratch.decode(scratch.encode(text)) == text
    ids = scratch.encode("😀")  # 4 UTF-8 bytes: a lone piece decodes to U+FFFD, never raises
    assert all(isinstance(scratch.decode(ids[:k]), str) for k in range(len(ids) + 1))


def test_pretokenize_matches_hf_byte_level():
    from tokenizers import pre_tokenizers
    hf = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert pretokenize("Hello world, it's 2024!") == ["Hello", "Ġworld", ",", "Ġit", "'s", "Ġ2024", "!"]
    for text in ["a  \n b", "x\n\n\ny", "  lead", "trail  ", "tab\tand\u3000ideographic", "é😀'S 'll"]:
        assert pretokenize(text) == [piece for piece, _ in hf.pre_tokenize_str(text)]
