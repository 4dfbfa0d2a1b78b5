"""Preference pairs as token ids, from the chat-format bins (build_preference_bins.py) or
straight from a JSONL file, rendered with the one chat template either way.

    pairs, dropped = load_preference_bins("data/bins/preference", "train", tok.hash, max_len=256)
    pairs, dropped = load_preference_pairs("my_pairs.jsonl", tok, max_len=256)

Both return ``PreferencePair``s (prompt ids ending with the assistant header; each reply's ids
through its ``<|im_end|>``) in file order, so a pair's position is its index for the
reference-log-prob cache. Replies longer than ``max_len`` (with the prompt) are cut at the
end; pairs whose prompt alone fills ``max_len`` are dropped and counted.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from align.preference import PreferencePair
from utils.errors import UserError


def _render(tokenizer: Any, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids ending with the assistant header, reply ids through its end-of-turn token),
    both from the one chat template."""
    from data_pipeline.tokenizer.chat_template import render_chat

    prompt, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
    full, mask = render_chat(tokenizer, messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise RuntimeError("chat template: a conversation does not start with its own generation prompt")
    last = max(i for i, m in enumerate(mask) if m)  # the reply ends at the last assistant token
    return list(prompt), list(full[len(prompt) : last + 1])


def load_preference_pairs(path: str, tokenizer: Any, max_len: int, limit: int = 0) -> tuple[list[PreferencePair], int]:
    """Tokenize a preference JSONL file: rows ``{"prompt": [messages] | str, "chosen": str,
    "rejected": str}``. Replies longer than ``max_len`` (with the prompt) are cut at the end;
    a pair whose prompt alone fills ``max_len`` is dropped. Returns (pairs, dropped).

    UserError (naming file and line) for a row with an empty or missing chosen/rejected
    reply or prompt: an empty reply would make the pair's log-prob 0 and silently teach
    the model that saying nothing is preferred.
    """
    from data_pipeline.jsonl import load_jsonl

    pairs, dropped = [], 0
    for n, row in enumerate(load_jsonl(path), start=1):
        if limit and len(pairs) >= limit:
            break
        prompt = row.get("prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        bad = [k for k in ("chosen", "rejected") if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad or not messages or not isinstance(messages, list) or (isinstance(prompt, str) and not prompt.strip()):
            what = f"empty or missing {' and '.join(bad)}" if bad else "an empty or missing prompt"
            raise UserError(f"{path} line {n}: {what}; every row needs a non-empty 'prompt' (messages or text) "
                            "and non-empty 'chosen' and 'rejected' replies. Fix or drop that row.")
        prompt_ids, chosen = _render(tokenizer, messages, row["chosen"])
        _, rejected = _render(tokenizer, messages, row["rejected"])
        pair = _fit(prompt_ids, chosen, rejected, max_len)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise UserError(f"{path} gave no usable preference pairs ({dropped} dropped: prompt longer than "
                        f"train.seq_len={max_len}); raise train.seq_len or check the file.")
    return pairs, dropped


def _fit(prompt: list[int], chosen: list[int], rejected: list[int], max_len: int) -> PreferencePair | None:
    room = max_len - len(prompt)
    return PreferencePair(prompt, chosen[:room], rejected[:room]) if room >= 1 else None


def load_preference_bins(bin_dir: str, split: str, tokenizer_hash: str | None, max_len: int,
                         limit: int = 0) -> tuple[list[PreferencePair], int]:
    """Pairs from ``data/bins/preference/{split}.*`` (read through data_pipeline.loader's
    PreferenceLoader, which checks the files and that they were built with this tokenizer)."""
    from data_pipeline.loader import PreferenceLoader

    src = PreferenceLoader(bin_dir, split, max_len, batch_size=1, shuffle=False, expect_tokenizer_hash=tokenizer_hash)
    tokens, mask = src.tokens, src.mask
    pairs, dropped = [], 0
    for n, (c_start, c_len, r_start, r_len, p_len) in enumerate(src.index.tolist()):
        if limit and len(pairs) >= limit:
            break
        sides = []
        for start, length in ((c_start, c_len), (r_start, r_len)):
            reply = np.flatnonzero(mask[start : start + length])  # the final reply and its <|im_end|>
            if reply.size < 2:
                raise UserError(f"{bin_dir} ({split}) pair {n} has an empty {'chosen' if not sides else 'rejected'} "
                                "reply; fix the raw preference file and rebuild the bins "
                                "(data_pipeline/processing/build_preference_bins.py).")
            sides.append(tokens[start + int(reply[0]) : start + int(reply[-1]) + 1].astype(np.int64).tolist())
        pair = _fit(tokens[c_start : c_start + p_len].astype(np.int64).tolist(), sides[0], sides[1], max_len)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    return pairs, dropped
