"""CUDA graphs of the decode step: one launch replays a whole forward for a fixed batch size.

At batch 1 a decode step is ~100 small kernels; on a GPU their launch overhead, not the
weights' bytes, sets the pace. A CUDA graph records the step once per batch-size bucket
(1, 2, 4, 8, ...) and replays it with new inputs copied into the same static buffers. What a
graph needs, the decode step here has: fixed shapes (rows padded up to the bucket, block tables
padded to the longest sequence the engine allows) and no data-dependent shapes (attention reads
the pools through the block table with the paged kernel instead of gathering them).

Padding rows write their key/value into a scratch block past the engine's blocks and attend
to it alone, so they never touch a real sequence. ``capture=False`` runs exactly the same
static-buffer code without recording a graph: how the CPU tests check it gives the engine's tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from inference.paged_cache import PagedKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graphable(model: torch.nn.Module) -> bool:
    """Whether every layer's decode step can take the paged kernel (softmax attention over all
    keys, no window, soft-cap or ALiBi): the condition for a graph of the whole step."""
    from model.attention import Attention

    layers = [b.attn for b in getattr(model, "layers", [])]
    return bool(layers) and all(isinstance(a, Attention) and a.window is None and a.softcap is None and a.alibi is None for a in layers)


def decode_settings(model: torch.nn.Module, device: torch.device, decode_kernel: Optional[bool],
                    cuda_graphs: Optional[bool]) -> tuple[bool, bool]:
    """The engine's (decode_kernel, cuda_graphs): None picks them on for CUDA (the kernel when Triton
    is installed, graphs when the kernel serves every layer); graphs asked for a model with layers
    the kernel does not serve are a UserError."""
    from model.kernels import triton_available
    from utils.errors import UserError

    fits = model.cache_kind == "kv" and graphable(model)
    on_gpu = device.type == "cuda"
    kernel = (on_gpu and triton_available()) if decode_kernel is None else decode_kernel
    graphs = (kernel and on_gpu and fits) if cuda_graphs is None else cuda_graphs
    if graphs and not fits:
        raise UserError("engine: cuda_graphs needs every layer to be plain softmax attention (no MLA, linear "
                        "attention, sliding window, soft-cap or ALiBi); turn cuda_graphs off for this model.")
    return kernel, graphs


class StaticDecodeView:
    """The cache interface over static tensors: one new token per row, attention through the kernel."""

    decode_kernel = True

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor):
        self.cache, self.slots, self.table, self.lens = cache, slots, table, lens
        self.states: dict = {}

    def key_positions(self, q_pos: torch.Tensor):
        return q_pos, None  # unused: every layer attends through the kernel

    def attend_decode(self, layer, q, k, v, scale):
        return self.cache.attend_decode(layer, self.slots, self.table, self.lens, q, k, v, scale)

    def update(self, layer, *new):
        raise RuntimeError("a graphed decode step attends through the paged kernel only")

    def advance(self, n: int) -> None:
        pass


class DecodeGraphs:
    """Per bucket B: static inputs (B, 1) ids and positions, (B, max_blocks) block table, (B,) lengths
    and write slots, and the logits (B, V) they produce; ``run`` copies a batch in and replays."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, max_blocks: int, max_batch: int,
                 capture: bool = True):
        self.model, self.cache, self.max_blocks, self.capture = model, cache, max_blocks, capture
        self.scratch_block = cache.num_blocks - 1  # the runner allocates one block more than the engine hands out
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.graphs: dict[int, tuple] = {}

    def _static(self, B: int) -> dict:
        dev = self.cache.device
        return {
            "idx": torch.zeros(B, 1, dtype=torch.long, device=dev),
            "pos": torch.zeros(B, 1, dtype=torch.long, device=dev),
            "table": torch.full((B, self.max_blocks), self.scratch_block, dtype=torch.long, device=dev),
            "lens": torch.ones(B, dtype=torch.long, device=dev),
            "slots": torch.full((B,), self.scratch_block * self.cache.block_size, dtype=torch.long, device=dev),
        }

    def _forward(self, s: dict) -> torch.Tensor:
        view = StaticDecodeView(self.cache, s["slots"], s["table"], s["lens"])
        hidden = self.model(s["idx"], positions=s["pos"], cache=view, return_hidden=True)
        return self.model.logits(hidden[:, 0]).float()

    def _graph(self, B: int) -> tuple:
        if B not in self.graphs:
            s = self._static(B)
            if not self.capture:
                self.graphs[B] = (s, None, None)
            else:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up outside the graph (allocations, autotuning)
                    self._forward(s)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._forward(s)
                self.graphs[B] = (s, graph, logits)
        return self.graphs[B]

    def run(self, token_ids: list[int], block_tables: list[list[int]], starts: list[int]) -> Optional[torch.Tensor]:
        """Logits (n, V) of one decode step for n rows, or None when n is above the largest bucket."""
        n = len(token_ids)
        B = next((b for b in self.buckets if b >= n), None)
        if B is None:
            return None
        s, graph, out = self._graph(B)
        bs = self.cache.block_size
        table = torch.full((B, self.max_blocks), self.scratch_block, dtype=torch.long)
        for i, bt in enumerate(block_tables):
            table[i, : len(bt)] = torch.tensor(bt[: self.max_blocks])
        pad = B - n
        s["idx"].copy_(torch.tensor(token_ids + [0] * pad).view(B, 1))
        s["pos"].copy_(torch.tensor(starts + [0] * pad).view(B, 1))
        s["table"].copy_(table)
        s["lens"].copy_(torch.tensor([st + 1 for st in starts] + [1] * pad))
        slots = [bt[st // bs] * bs + st % bs for bt, st in zip(block_tables, starts)]
        s["slots"].copy_(torch.tensor(slots + [self.scratch_block * bs] * pad))
        if graph is None:
            out = self._forward(s)
        else:
            graph.replay()
        return out[:n]
