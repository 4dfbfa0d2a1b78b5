"""ModelRunner: turn a scheduled batch into model inputs, run the model, return logits.

Rows are padded to the longest row (T). Padding columns repeat the row's last real position,
so they see exactly the keys the last real token sees (never an empty softmax, never a
position past the model's table); their outputs are ignored and the cache does not store them.

Linear attention keeps a recurrent state per sequence instead of keys/values. A running sum
cannot skip padding, so such models run rows of equal length together, and the runner keeps
each sequence's state between steps (a row starting at position 0 starts from a fresh state,
which makes recompute after preemption correct without any bookkeeping).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from inference.paged_cache import PagedKVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device | str,
                 kv_dtype: Optional[torch.dtype] = None, decode_kernel: bool = False,
                 graphs_for: Optional[tuple[int, int]] = None):
        """decode_kernel: decode steps attend through the block table (model/kernels' paged kernel).
        graphs_for=(max_blocks per sequence, max batch): decode steps replay CUDA graphs
        (inference/cuda_graphs.py; on CPU the same static buffers run without a graph)."""
        self.model = model
        self.device = torch.device(device)
        extra = 1 if graphs_for else 0  # a scratch block for the graphs' padding rows
        self.cache = PagedKVCache(num_blocks + extra, block_size, self.device, kv_dtype)
        self.decode_kernel = decode_kernel or bool(graphs_for)
        self.graphs = None
        if graphs_for:
            from inference.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.cache, *graphs_for, capture=self.device.type == "cuda")
        self.recurrent = model.cache_kind == "recurrent"
        self.states: dict[int, dict[int, object]] = {}  # seq_id -> layer -> state with batch dim 1

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[list[int]],
        block_tables: list[list[int]],
        starts: list[int],
        all_positions: bool = False,
        copies: Optional[list[tuple[int, int]]] = None,
        seq_ids: Optional[list[int]] = None,
        return_hidden: bool = False,
        images: Optional[list] = None,
    ):
        """Row b computes ``token_ids[b]`` at positions starts[b], starts[b]+1, ...

        Returns float32 logits of each row's last token (B, V), or with ``all_positions``
        of every token (B, T, V) (padding columns hold garbage). ``seq_ids`` name the rows'
        sequences (needed for recurrent models). ``return_hidden`` also returns the final hidden
        states of every position, (logits, hidden (B, T, d)), for prompt log-probabilities.
        ``images``: each row's ImageInputs or None (inference/images.py); the placeholders a row
        computes get their image embeddings.
        """
        if copies:
            self.cache.copy_blocks(copies)
        if images is not None and any(img is not None for img in images):
            from inference.images import chunk_images

            images = chunk_images(images, starts, [len(t) for t in token_ids], max(len(t) for t in token_ids))
        else:
            images = None
        if self.recurrent and images is not None:  # refused at admission (engine.add_request)
            raise ValueError("images with a recurrent (linear attention) model are not supported")
        if self.recurrent:
            logits, hidden = self._run_recurrent(token_ids, block_tables, starts, all_positions, seq_ids, return_hidden)
            return (logits, hidden) if return_hidden else logits
        if (self.graphs is not None and not all_positions and not return_hidden and images is None
                and all(len(t) == 1 for t in token_ids)):
            logits = self.graphs.run([t[0] for t in token_ids], block_tables, starts)
            if logits is not None:
                return logits
        logits, hidden = self._forward(token_ids, block_tables, starts, all_positions, None, images)
        return (logits, hidden) if return_hidden else logits

    def _forward(self, token_ids, block_tables, starts, all_positions, states, images=None) -> tuple[torch.Tensor, torch.Tensor]:
        q_lens = [len(t) for t in token_ids]
        B, T = len(token_ids), max(q_lens)
        idx = [toks + [0] * (T - len(toks)) for toks in token_ids]
        positions = [list(range(s, s + len(toks))) + [s + len(toks) - 1] * (T - len(toks)) for toks, s in zip(token_ids, starts)]
        idx = torch.tensor(idx, dtype=torch.long, device=self.device)  # (B, T)
        positions = torch.tensor(positions, dtype=torch.long, device=self.device)  # (B, T)
        view = self.cache.view(block_tables, starts, q_lens, key_mask=states is None, decode_kernel=self.decode_kernel)
        if states is not None:
            view.states = states
        extra = {}
        if images is not None:  # (image_mask (B, T), image_embeds (N, d)) of this forward's placeholders
            extra = {"image_mask": images[0].to(self.device), "image_embeds": images[1]}
        hidden = self.model(idx, positions=positions, cache=view, return_hidden=True, **extra)  # (B, T, d)
        if states is not None:
            states.update(view.states)
        if all_positions:
            return self.model.logits(hidden).float(), hidden
        if T == 1:
            return self.model.logits(hidden[:, 0]).float(), hidden
        last = torch.tensor(q_lens, device=self.device) - 1
        return self.model.logits(hidden[torch.arange(B, device=self.device), last]).float(), hidden  # (B, V)

    # ---- recurrent state (linear attention) --------------------------------------------------
    def _run_recurrent(self, token_ids, block_tables, starts, all_positions, seq_ids, return_hidden) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        assert seq_ids is not None, "recurrent models need seq_ids"
        groups: dict[int, list[int]] = defaultdict(list)  # rows of equal length run together
        for b, toks in enumerate(token_ids):
            groups[len(toks)].append(b)
        out: list[Optional[torch.Tensor]] = [None] * len(token_ids)
        hid: list[Optional[torch.Tensor]] = [None] * len(token_ids)
        for rows in groups.values():
            ids = [seq_ids[b] for b in rows]
            states = self._gather_states(ids, [starts[b] for b in rows])
            logits, hidden = self._forward([token_ids[b] for b in rows], [block_tables[b] for b in rows], [starts[b] for b in rows], all_positions, states)
            for i, sid in enumerate(ids):
                self.states[sid] = {layer: _index_state(s, i) for layer, s in states.items()}
            for i, b in enumerate(rows):
                out[b], hid[b] = logits[i], hidden[i]
        T = max(h.shape[0] for h in hid)
        if all_positions:
            out = [torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[0])) for t in out]
        if not return_hidden:
            return torch.stack(out), None
        return torch.stack(out), torch.stack([torch.nn.functional.pad(h, (0, 0, 0, T - h.shape[0])) for h in hid])  # (B, T, d)

    def _gather_states(self, ids: list[int], starts: list[int]) -> dict[int, object]:
        """Batched per-layer state for these sequences; a row at position 0 starts fresh (zeros)."""
        have = [self.states.get(sid) if s > 0 else None for sid, s in zip(ids, starts)]
        template = next((h for h in have if h), None)
        if template is None:
            return {}  # every row starts fresh: the model creates zero states
        return {
            layer: _cat_states([h[layer] if h else _zeros_like_state(ref) for h in have])
            for layer, ref in template.items()
        }

    def fork_state(self, parent_id: int, child_id: int) -> None:
        if parent_id in self.states:  # states are replaced, never modified in place: sharing is safe
            self.states[child_id] = dict(self.states[parent_id])

    def drop_state(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)


def _index_state(state, i: int):
    if isinstance(state, torch.Tensor):
        return state[i : i + 1]
    return type(state)(_index_state(s, i) for s in state)


def _cat_states(states: list):
    if isinstance(states[0], torch.Tensor):
        return torch.cat(states, 0)
    return type(states[0])(_cat_states([s[j] for s in states]) for j in range(len(states[0])))


def _zeros_like_state(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return type(state)(_zeros_like_state(s) for s in state)
