"""ModelRunner: turn a scheduled batch into model inputs, run the model, return logits.

Rows are padded to the longest row (T). Padding columns repeat the row's last real position,
so they see exactly the keys the last real token sees (never an empty softmax, never a
position past the model's table); their outputs are ignored and the cache does not store them.
"""
from __future__ import annotations

from typing import Optional

import torch

from inference.paged_cache import PagedKVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device | str):
        self.model = model
        self.device = torch.device(device)
        self.cache = PagedKVCache(num_blocks, block_size, self.device)

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[list[int]],
        block_tables: list[list[int]],
        starts: list[int],
        all_positions: bool = False,
        copies: Optional[list[tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """Row b computes ``token_ids[b]`` at positions starts[b], starts[b]+1, ...

        Returns float32 logits of each row's last token (B, V), or with ``all_positions``
        of every token (B, T, V) (padding columns hold garbage).
        """
        if copies:
            self.cache.copy_blocks(copies)
        q_lens = [len(t) for t in token_ids]
        B, T = len(token_ids), max(q_lens)
        idx = [toks + [0] * (T - len(toks)) for toks in token_ids]
        positions = [list(range(s, s + len(toks))) + [s + len(toks) - 1] * (T - len(toks)) for toks, s in zip(token_ids, starts)]
        idx = torch.tensor(idx, dtype=torch.long, device=self.device)  # (B, T)
        positions = torch.tensor(positions, dtype=torch.long, device=self.device)  # (B, T)
        view = self.cache.view(block_tables, starts, q_lens)
        hidden = self.model(idx, positions=positions, cache=view, return_hidden=True)  # (B, T, d)
        if all_positions:
            return self.model.logits(hidden).float()
        last = torch.tensor(q_lens, device=self.device) - 1
        hidden = hidden[torch.arange(B, device=self.device), last]  # (B, d)
        return self.model.logits(hidden).float()
