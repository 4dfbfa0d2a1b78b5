"""A scalar head on the LM backbone: the reward model (one score per sequence) and the
PPO critic (one value per token).

    model = ScalarHeadModel(Transformer(cfg))            # or: model.load.load_model(dir, expect="scalar_head")
    values = model(idx)                                  # (B, T): a score for every prefix
    scores = model.score(idx, lengths)                   # (B,): the score after the last real token

The backbone is the project's one Transformer, called with ``return_hidden=True``; the head is
``Linear(d_model, 1)``. A reward-model checkpoint stores the backbone under its usual
parameter names plus ``score_head.weight`` / ``score_head.bias`` and says ``kind:
scalar_head`` in meta.json, so ``model.load`` rebuilds it from the directory alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch.nn as nn
from torch import Tensor

from model.transformer import Transformer
from utils.errors import UserError

HEAD_PREFIX = "score_head."
KIND = "scalar_head"


class ScalarHeadModel(nn.Module):
    """Transformer backbone + Linear(d_model, 1). ``cfg`` is the backbone's ModelConfig (so
    checkpoint code that reads ``model.cfg`` works unchanged)."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.score_head = nn.Linear(backbone.cfg.d_model, 1)
        # Small init so the first scores (and value targets) start near 0 and the BT loss
        # starts near ln 2 instead of being dominated by a random head.
        nn.init.normal_(self.score_head.weight, std=1.0 / (backbone.cfg.d_model + 1))
        nn.init.zeros_(self.score_head.bias)
        # The LM head is never used here; an untied one is frozen so DDP does not wait for
        # its gradient and the optimizer does not carry state for it.
        if not backbone.cfg.tie_embeddings:
            backbone.lm_head.weight.requires_grad_(False)

    def forward(self, idx: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) -> (B, T) float32 values; entry t scores the prefix idx[:, :t+1]."""
        hidden = self.backbone(idx, positions=positions, return_hidden=True)  # (B, T, d_model)
        return self.score_head(hidden).squeeze(-1).float()

    def score(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Sequence scores (B,) read at the last real token of each right-padded row.

        lengths (B,) counts real tokens (>= 1); padding after them cannot influence the
        score because attention is causal.
        """
        if (lengths < 1).any() or (lengths > idx.shape[1]).any():
            raise ValueError(f"lengths must be in [1, {idx.shape[1]}], got {lengths.tolist()}")
        values = self(idx)  # (B, T)
        last = (lengths - 1).long().to(values.device)
        return values.gather(1, last.unsqueeze(1)).squeeze(1)

    def aux_loss(self) -> Optional[Tensor]:
        return self.backbone.aux_loss()  # an MoE backbone's balance loss (model/loss.py adds it)

    def weights(self, live: bool = False) -> dict[str, Tensor]:
        """What a checkpoint stores: the backbone under its plain parameter names (a tied head
        once, see ``Transformer.weights``) plus ``score_head.weight`` / ``score_head.bias``.
        ``live=True`` returns the tensors themselves (the training loop's ``weights_fn``)."""
        state = self.backbone.weights(live)
        for name, t in self.score_head.state_dict(keep_vars=live).items():
            state[HEAD_PREFIX + name] = t if live else t.detach().cpu().contiguous()
        return state


# ----------------------------------------------------------------------------- save / load


def save_scalar_model(path: str | os.PathLike, model: ScalarHeadModel, **kwargs) -> Path:
    """Atomic checkpoint directory of a reward model / critic (see module docstring); ``model.load``
    reads it back."""
    from utils.checkpoint import save_checkpoint

    meta = {"kind": KIND, **kwargs.pop("meta", {})}
    return save_checkpoint(path, model, weights=model.weights(), meta=meta, **kwargs)


def load_scalar_state(model: ScalarHeadModel, state: dict[str, Tensor], source: str) -> None:
    """Load a ``ScalarHeadModel.weights()`` dict into ``model`` (clear error if it does not fit)."""
    from utils.checkpoint import load_into

    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if set(head) != {"weight", "bias"}:
        raise UserError(
            f"{source} has no scalar head ({HEAD_PREFIX}weight/bias); it is a language-model checkpoint, "
            "not a reward model. Train one with align/train_offline.py algorithm=reward."
        )
    load_into(model.backbone, {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}, source)
    model.score_head.load_state_dict(head)
