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


def load_preference_pairs(path: str, tokenizer: Any, max_len: int, limit: int = 0, fields: dict | None = None,
                          on_bad_row: str = "error", split: str = "train") -> tuple[list[PreferencePair], int]:
    """Tokenize a preference file in TRL's form (data_pipeline/user_data.py: JSONL, JSON, Parquet, a
    save_to_disk folder or hf:<name>; rows ``{"prompt": str | [messages], "chosen": str | [messages],
    "rejected": ...}``, or chosen/rejected as whole conversations without a prompt; ``fields`` renames
    them). Replies longer than ``max_len`` (with the prompt) are cut at the end; a pair whose prompt
    alone fills ``max_len`` is dropped. Returns (pairs, dropped).

    A bad row (e.g. an empty chosen/rejected reply, which would silently teach the model that
    saying nothing is preferred) is a UserError naming file and line, or with
    ``on_bad_row="skip"`` skipped and counted (in ``dropped``).
    """
    from data_pipeline.user_data import field_names, read_rows, to_preference

    fields = field_names(fields)
    pairs, dropped, skipped = [], 0, 0
    for where, row in read_rows(path, split):
        if limit and len(pairs) >= limit:
            break
        try:
            messages, chosen_text, rejected_text = to_preference(row, fields)
            prompt_ids, chosen = _render(tokenizer, messages, chosen_text)
            _, rejected = _render(tokenizer, messages, rejected_text)
        except UserError as err:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise UserError(f"{where}: {err}; every row needs a non-empty prompt (text or messages) and non-empty "
                            "chosen and rejected replies. Fix or drop that row, or set data.on_bad_row: skip.") from None
        pair = _fit(prompt_ids, chosen, rejected, max_len)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if skipped:
        print(f"{path}: skipped {skipped} bad row(s) (data.on_bad_row: skip)")
    if not pairs:
        raise UserError(f"{path} gave no usable preference pairs ({dropped} dropped: prompt longer than "
                        f"train.seq_len={max_len}; {skipped} bad rows skipped); raise train.seq_len or check the file.")
    return pairs, dropped + skipped


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
