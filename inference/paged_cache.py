"""PagedKVCache: block-pool storage of keys/values, and the per-forward view the model calls.

Storage: the cache has ``num_blocks * block_size`` token slots; slot
``block * block_size + offset`` holds one token. Per layer and per cached tensor (k and v;
MLA's latent and rope key) there is one pool laid out like the model's tensor with the batch
folded into the sequence: a model tensor (B, *mid, T, D) is stored in a pool (*mid, slots, D),
e.g. k (B, Hkv, T, D) -> (Hkv, slots, D). Pools are created on first use, so any attention in
the zoo caches whatever it hands to ``cache.update``; a storage ``dtype`` (bf16) halves an fp32
model's cache, converted on write and back on read. With the slot dimension at -2 a gather
for one row is already the contiguous (1, *mid, Tk, D) tensor attention wants.

``PagedView`` implements the model's cache interface (model/cache.py) for a batch of rows
of different lengths: row b already has ``starts[b]`` tokens cached and computes
``q_lens[b]`` new ones (padded to T). ``update`` writes the new rows' tensors into their
slots and gathers each row's slots into a padded (B, *mid, Tk, D) tensor; ``key_positions``
marks the padding with ``k_valid`` so the model's mask hides it.
"""
from __future__ import annotations

from typing import Optional

import torch


class PagedKVCache:
    def __init__(self, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
                 dtype: Optional[torch.dtype] = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self.dtype = dtype  # storage dtype (e.g. bf16: half the bytes); None: the model's tensors' dtype
        self.pools: dict[int, list[torch.Tensor]] = {}  # layer -> [(*mid, slots, D) per cached tensor]
        self._offsets = torch.arange(block_size, device=self.device)

    def pool_for(self, layer: int, new: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if layer not in self.pools:
            slots = self.num_blocks * self.block_size
            self.pools[layer] = [
                torch.zeros(*t.shape[1:-2], slots, t.shape[-1], dtype=self.dtype or t.dtype, device=t.device) for t in new
            ]
        return self.pools[layer]

    def block_slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """Block ids (...,) -> their slot ids (..., block_size)."""
        return blocks[..., None] * self.block_size + self._offsets

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src in every pool."""
        if not copies:
            return
        src = self.block_slots(torch.tensor([c[0] for c in copies], device=self.device)).view(-1)
        dst = self.block_slots(torch.tensor([c[1] for c in copies], device=self.device)).view(-1)
        for pools in self.pools.values():
            for pool in pools:
                pool.index_copy_(-2, dst, pool.index_select(-2, src))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for pools in self.pools.values() for p in pools)

    def view(self, block_tables: list[list[int]], starts: list[int], q_lens: list[int], key_mask: bool = True,
             decode_kernel: bool = False) -> "PagedView":
        return PagedView(self, block_tables, starts, q_lens, key_mask, decode_kernel)

    def write_decode(self, layer: int, slots: torch.Tensor, *new: torch.Tensor) -> list[torch.Tensor]:
        """Store one new token per row, new (B, *mid, 1, D), at ``slots`` (B,); returns the layer's pools."""
        pools = self.pool_for(layer, new)
        for pool, t in zip(pools, new):
            rows = t[..., 0, :].movedim(0, -2)  # (*mid, B, D)
            pool.index_copy_(-2, slots, rows.to(pool.dtype))
        return pools

    def attend_decode(self, layer: int, slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                      q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention read straight from the pools through the block table (the paged kernel
        of model/kernels; no gather): q (B, H, 1, D), k/v (B, Hkv, 1, D) -> (B, H, 1, D).
        ``table`` (B, n_blocks) and ``lens`` (B,) (cached tokens including the new one) are tensors,
        so a CUDA graph can replay this with new values."""
        from model import kernels

        k_pool, v_pool = self.write_decode(layer, slots, k, v)
        bs = self.block_size
        out = kernels.paged_attention_decode(q[:, :, 0], kernels.blocks_view(k_pool, bs), kernels.blocks_view(v_pool, bs),
                                             table, lens, scale)
        return out[:, :, None]


class PagedView:
    """The cache interface for one forward over rows of different lengths.

    block_tables[b]: row b's physical blocks; starts[b]: tokens already cached;
    q_lens[b]: new tokens this forward (the rest of the T columns are padding).
    ``key_mask=False`` reports no key padding (recurrent layers, which cache no keys).
    """

    def __init__(
        self, cache: PagedKVCache, block_tables: list[list[int]], starts: list[int], q_lens: list[int], key_mask: bool = True,
        decode_kernel: bool = False,
    ):
        # Built from Python lists with a handful of tensor calls: this runs every decode step.
        self.cache = cache
        self.states: dict[int, object] = {}
        dev, bs = cache.device, cache.block_size
        B, T = len(starts), max(q_lens)
        totals = [s + q for s, q in zip(starts, q_lens)]
        self.B, self.Tk = B, max(totals)
        n_blocks = -(-self.Tk // bs)
        rows = [bt[:n_blocks] + [0] * (n_blocks - len(bt[:n_blocks])) for bt in block_tables]
        table = torch.tensor(rows, dtype=torch.long, device=dev)  # (B, n_blocks); padding -> block 0, masked
        # Slots every row reads (B * Tk,) and the slots of the new tokens (padding dropped).
        self.read_slots = cache.block_slots(table).view(B, n_blocks * bs)[:, : self.Tk].reshape(-1)
        slots = [bt[p // bs] * bs + p % bs for bt, s, q in zip(block_tables, starts, q_lens) for p in range(s, s + q)]
        self.write_slots = torch.tensor(slots, dtype=torch.long, device=dev)  # (num_real,)
        self.uniform = all(s == starts[0] for s in starts) and all(q == q_lens[0] for q in q_lens)
        # One new token per row: attention layers may read the pools through the block table instead
        # of gathering them (``attend_decode``); ``table`` and ``lens`` are what the kernel reads.
        self.decode_kernel = decode_kernel and T == 1
        if self.decode_kernel:
            self.table, self.lens = table, torch.tensor(totals, device=dev)
        self.real = self.k_valid = None
        if not self.uniform:
            real = [c < q for q in q_lens for c in range(T)]
            self.real = torch.tensor(real, device=dev)  # (B*T,) which new tokens are not padding
            if key_mask:
                self.k_valid = torch.arange(self.Tk, device=dev)[None, :] < torch.tensor(totals, device=dev)[:, None]

    # ---- the model's cache interface ------------------------------------------------------------
    def key_positions(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        k_pos = torch.arange(self.Tk, device=q_pos.device).expand(q_pos.shape[0], -1)
        return k_pos, self.k_valid  # None when every row has the same keys: no padding to hide

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pools = self.cache.pool_for(layer, new)
        out = []
        for pool, t in zip(pools, new):
            B, T = t.shape[0], t.shape[-2]
            # (B, *mid, T, D) -> (*mid, B*T, D): the batch folded into the token axis
            rows = t.movedim(0, -3).reshape(*pool.shape[:-2], B * T, t.shape[-1])
            if self.real is not None:
                rows = rows[..., self.real, :]
            pool.index_copy_(-2, self.write_slots, rows if rows.dtype == pool.dtype else rows.to(pool.dtype))
            keys = pool.index_select(-2, self.read_slots).to(t.dtype)  # (*mid, B*Tk, D), in the model's dtype
            out.append(keys.view(*pool.shape[:-2], B, self.Tk, t.shape[-1]).movedim(-3, 0))  # (B, *mid, Tk, D)
        return tuple(out)

    def attend_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """The optional fourth method of the cache interface (model/cache.py): when ``decode_kernel``
        is set, attention hands over q/k/v of its one new token and gets the attended values."""
        return self.cache.attend_decode(layer, self.write_slots, self.table, self.lens, q, k, v, scale)

    def advance(self, n: int) -> None:
        pass  # lengths live in the scheduler's sequences

    @property
    def length(self) -> int:
        raise RuntimeError("PagedView needs explicit positions; the model runner always passes them")
