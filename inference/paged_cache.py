"""PagedKVCache: block-pool storage of keys/values, and the per-forward view the model calls.

Storage: per layer and per cached tensor (k and v; MLA's latent and rope key) one pool of
shape (num_blocks, block_size, *mid, D) for a model tensor laid out (B, *mid, T, D), e.g.
k (B, Hkv, T, D) -> pool (num_blocks, block_size, Hkv, D). Pools are created on first use,
so any attention in the zoo caches whatever it hands to ``cache.update``.

``PagedView`` implements the model's cache interface (model/cache.py) for a batch of rows
of different lengths: row b already has ``starts[b]`` tokens cached and computes
``q_lens[b]`` new ones (padded to T). ``update`` writes the new rows' tensors into their
slots and gathers each row's blocks into a padded (B, *mid, Tk, D) tensor; ``key_positions``
marks the padding with ``k_valid`` so the model's mask hides it.
"""
from __future__ import annotations

from typing import Optional

import torch


class PagedKVCache:
    def __init__(self, num_blocks: int, block_size: int, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self.pools: dict[int, list[torch.Tensor]] = {}  # layer -> [pool per cached tensor]

    def pool_for(self, layer: int, new: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if layer not in self.pools:
            self.pools[layer] = [
                torch.zeros(self.num_blocks, self.block_size, *t.shape[1:-2], t.shape[-1], dtype=t.dtype, device=t.device)
                for t in new
            ]
        return self.pools[layer]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src in every pool."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for pools in self.pools.values():
            for pool in pools:
                pool[dst] = pool[src]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for pools in self.pools.values() for p in pools)

    def view(self, block_tables: list[list[int]], starts: list[int], q_lens: list[int]) -> "PagedView":
        return PagedView(self, block_tables, starts, q_lens)


class PagedView:
    """The cache interface for one forward over rows of different lengths.

    block_tables[b]: row b's physical blocks; starts[b]: tokens already cached;
    q_lens[b]: new tokens this forward (the rest of the T columns are padding).
    """

    def __init__(self, cache: PagedKVCache, block_tables: list[list[int]], starts: list[int], q_lens: list[int]):
        self.cache = cache
        self.states: dict[int, object] = {}
        dev, bs = cache.device, cache.block_size
        B, T = len(starts), max(q_lens)
        totals = [s + q for s, q in zip(starts, q_lens)]
        self.Tk = max(totals)
        n_blocks = -(-self.Tk // bs)
        table = torch.zeros(B, n_blocks, dtype=torch.long)
        for b, bt in enumerate(block_tables):
            n = min(len(bt), n_blocks)
            table[b, :n] = torch.tensor(bt[:n], dtype=torch.long)
        self.table = table.to(dev)  # (B, n_blocks)
        starts_t = torch.tensor(starts, dtype=torch.long)
        q_lens_t = torch.tensor(q_lens, dtype=torch.long)
        # Slots of the new tokens, row-major over (B, T), padding dropped.
        pos = starts_t[:, None] + torch.arange(T)[None, :]  # (B, T)
        real = torch.arange(T)[None, :] < q_lens_t[:, None]
        self.uniform = all(s == starts[0] for s in starts) and all(q == q_lens[0] for q in q_lens)
        pos_real = pos[real]
        blk = table[real.nonzero()[:, 0], pos_real // bs]
        self.write_slots = (blk * bs + pos_real % bs).to(dev)  # (num_real,)
        self.real = None if self.uniform else real.reshape(-1).to(dev)  # (B*T,) which rows of the batch are real
        self.totals = torch.tensor(totals, dtype=torch.long, device=dev)

    # ---- the model's cache interface ------------------------------------------------------------
    def key_positions(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B = q_pos.shape[0]
        k_pos = torch.arange(self.Tk, device=q_pos.device).expand(B, -1)
        if self.uniform:  # every row has the same keys: no padding to hide
            return k_pos, None
        return k_pos, k_pos < self.totals[:, None]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pools = self.cache.pool_for(layer, new)
        B, T = new[0].shape[0], new[0].shape[-2]
        out = []
        for pool, t in zip(pools, new):
            # (B, *mid, T, D) -> (B*T, *mid, D): one row per new token
            rows = t.movedim(-2, 1).reshape(B * T, *pool.shape[2:])
            if self.real is not None:
                rows = rows[self.real]
            flat = pool.view(-1, *pool.shape[2:])  # (num_blocks*block_size, *mid, D)
            flat.index_copy_(0, self.write_slots, rows.to(pool.dtype))
            # Gather whole blocks: (B, n_blocks, block_size, *mid, D) -> (B, Tk, *mid, D)
            keys = pool[self.table].flatten(1, 2)[:, : self.Tk]
            out.append(keys.movedim(1, -2))  # (B, *mid, Tk, D)
        return tuple(out)

    def advance(self, n: int) -> None:
        pass  # lengths live in the scheduler's sequences

    @property
    def length(self) -> int:
        raise RuntimeError("PagedView needs explicit positions; the model runner always passes them")
