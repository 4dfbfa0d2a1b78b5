"""Pipeline stages of the one Transformer, for torch.distributed.pipelining.

    stage = PipelineStageModule(model, index, n_stages)   # prunes ``model`` in place to its layers

Stage i holds the blocks ``stage_layers(n_layers, n)[i]``; the first also holds the embedding, the
last the final norm and the head. A stage's forward takes what the stage before it sent (token ids
on the first stage, hidden states (B, T, d_model) after) and returns hidden states, or the logits
(B, T, vocab) on the last stage. The pruned model keeps its parameter names (``layers.3.attn...``),
so the stages' state dicts together are the whole model's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.attention import AttnMask
from utils.errors import UserError


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, as even as possible; the earlier stages take the extra layers."""
    per, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + per + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def check_pipeline(model: nn.Module, n_stages: int) -> None:
    cfg = model.cfg
    problems = []
    if n_stages > cfg.n_layers:
        problems.append(f"pp={n_stages} stages but only {cfg.n_layers} layers")
    if cfg.tie_embeddings:
        problems.append("tie_embeddings shares one tensor between the first stage (embedding) and the last (head)")
    if cfg.ffn == "moe":
        problems.append("MoE layers (their balance bias and loss are kept per process group, not per stage)")
    if problems:
        raise UserError(f"train.parallel.pp={n_stages} does not fit this model: {'; '.join(problems)}. "
                        "Use pp: 1 (FSDP2 / TP instead).")


class PipelineStageModule(nn.Module):
    """Stage ``index`` of ``n_stages`` of a Transformer (see the module docstring)."""

    def __init__(self, model: nn.Module, index: int, n_stages: int):
        super().__init__()
        check_pipeline(model, n_stages)
        self.layers = stage_layers(model.cfg.n_layers, n_stages)[index]
        self.first, self.last = index == 0, index == n_stages - 1
        for i in range(model.cfg.n_layers):
            if i not in self.layers:
                model.layers[i] = nn.Module()  # a placeholder without weights: another stage runs it
        if not self.first:
            model.embed = model.pos_embed = None
        if not self.last:
            model.norm = model.lm_head = None
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) (first stage) or hidden states (B, T, d) -> hidden states, or logits (last)."""
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        m = self.model
        h = m.embed_tokens(x, positions) if self.first else x
        h = m.run_blocks(h, positions, AttnMask(positions, positions, None), layers=self.layers)
        return m.logits(m.norm(h)) if self.last else h
