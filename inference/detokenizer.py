"""Incremental detokenization and stop strings (only used when the engine has a tokenizer).

Decoding a growing id list token by token is wrong for byte-level BPE: one character can
span several tokens, and a partial UTF-8 sequence decodes to U+FFFD. We decode a short
window (the previous token(s) plus the new ones) and emit text only once it no longer ends
in a replacement character (the vLLM "prefix/read offset" scheme).

Stop strings: after each new piece of text, search the tail for every stop string; on a
match the text is cut before it. While generating, the last ``max(len(stop)) - 1`` characters
are held back from streaming so a stop string is never half-sent.
"""
from __future__ import annotations

from typing import Optional


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] are already in text (context)
        self.read_offset = 0
        self.emitted = 0  # characters of text already streamed

    def update(self, ids: list[int]) -> Optional[int]:
        """Add text for ids[read_offset:]. Returns the index in ``text`` where a stop string
        starts (text is then cut there), else None."""
        prefix = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        if not self.stop:
            return None
        search_from = max(0, old_len - self.holdback)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return None
        cut = min(hits)
        self.text = self.text[:cut]
        return cut

    def flush(self, ids: list[int]) -> None:
        """The sequence ended: keep whatever is still pending, even a lone replacement char."""
        prefix = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(ids)

    def new_text(self, finished: bool) -> str:
        """Text not streamed yet (holding back a possible stop-string prefix unless finished)."""
        end = len(self.text) if finished or not self.stop else max(self.emitted, len(self.text) - self.holdback)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
