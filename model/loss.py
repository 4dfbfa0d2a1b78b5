"""The next-token loss every trainer shares (pretraining, SFT): mean cross-entropy of the LM
head over the counted targets, through the chunked head + loss when the head is a plain
Linear (model/kernels: the (N, V) logits are never materialised, which on CPU is also ~20%
faster than logits + F.cross_entropy at V=4096), else through the model's own logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.kernels import linear_cross_entropy
from utils.distributed import is_dtensor, unwrap


def lm_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
            positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean CE of model(x) (B, T, V) against targets (B, T), -100 where a target does not count
    (0 when none counts). ``model`` may be wrapped (DDP, compile); an adapted head (LoRA,
    modules_to_save) or an FSDP-sharded one goes through the module."""
    head = unwrap(model).lm_head
    if type(head) is nn.Linear and not is_dtensor(head.weight):
        hidden = model(x, positions=positions, return_hidden=True)  # (B, T, d_model)
        return linear_cross_entropy(hidden.flatten(0, 1), head.weight, targets.flatten(),
                                    softcap=unwrap(model).cfg.final_logit_softcap)
    logits = model(x, positions=positions)
    n = (targets != -100).sum().clamp(min=1)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum") / n
