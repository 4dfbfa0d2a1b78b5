"""The KV-cache interface the model calls, and a contiguous cache for simple decoding.

The model never knows how a cache stores things. Per forward it asks the cache for
the key positions (to build the mask), per layer it hands over the new tensors and
gets back everything the layer should attend to, and at the end it advances the cache.
The paged cache of ``inference/`` implements the same three methods, and optionally a fourth:
when it sets ``decode_kernel`` (one new token per row), plain softmax attention calls
``attend_decode(layer, q, k, v, scale)`` instead of ``update``, and the cache both stores the
new keys and computes the attention (the paged kernel reads them through the block table).
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Contiguous cache for a batch whose rows share positions (prefill, then decode).

    Any per-layer tensors can be cached (k and v; MLA's latent and rope key), each laid out
    with the sequence at dim -2, e.g. (B, n_kv_heads, T, head_dim). Storage is allocated on
    first use with room for ``max_len`` positions. ``states`` holds recurrent state for
    layers that keep one (linear attention).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.store: dict[int, list[torch.Tensor]] = {}
        self.states: dict[int, object] = {}

    def key_positions(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Positions of every key a query of this forward may see: (B, length + T), no padding."""
        B, T = q_pos.shape
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length + T} requested")
        k_pos = torch.arange(self.length + T, device=q_pos.device).expand(B, -1)
        return k_pos, None

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, T = self.length, new[0].shape[-2]
        if layer not in self.store:
            self.store[layer] = [
                torch.zeros(*t.shape[:-2], self.max_len, t.shape[-1], dtype=t.dtype, device=t.device) for t in new
            ]
        out = []
        for buf, t in zip(self.store[layer], new):
            buf[..., s : s + T, :] = t
            out.append(buf[..., : s + T, :])
        return tuple(out)

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes_per_token(self) -> int:
        """Bytes the cache stores for one token across all layers (batch row 0)."""
        total = 0
        for bufs in self.store.values():
            for b in bufs:
                total += b[0].numel() // self.max_len * b.element_size()
        return total
