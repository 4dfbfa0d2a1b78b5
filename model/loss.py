"""The next-token loss every trainer shares (pretraining, SFT): mean cross-entropy of the LM
head over the counted targets, through the chunked head + loss when the head is a plain
Linear (model/kernels: the (N, V) logits are never materialised, which on CPU is also ~20%
faster than logits + F.cross_entropy at V=4096), else through the model's own logits.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.kernels import linear_cross_entropy
from utils.distributed import is_dtensor, unwrap


def lm_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
            positions: Optional[torch.Tensor] = None, documents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean CE of model(x) (B, T, V) against targets (B, T), -100 where a target does not count
    (0 when none counts). ``positions``/``documents`` (B, T): packed rows with document masking
    (``Transformer.forward``). ``model`` may be wrapped (DDP, compile); an adapted head (LoRA,
    modules_to_save) or an FSDP-sharded one goes through the module."""
    head = unwrap(model).lm_head
    if type(head) is nn.Linear and not is_dtensor(head.weight):
        hidden = model(x, positions=positions, return_hidden=True, documents=documents).flatten(0, 1)  # (B*T, d_model)
        targets = targets.flatten()
        counted = targets != -100
        if not bool(counted.all()) and bool(counted.any()):
            # SFT: prompt and padding rows do not count, so the head never runs on them (on chat
            # data most of a row is prompt); the mean over counted targets is unchanged.
            hidden, targets = hidden[counted], targets[counted]
        return linear_cross_entropy(hidden, head.weight, targets, softcap=unwrap(model).cfg.final_logit_softcap)
    logits = model(x, positions=positions, documents=documents)
    n = (targets != -100).sum().clamp(min=1)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum") / n


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]


def with_aux_loss(loss_fn: LossFn, enabled: bool = True, log: Callable[[str], None] = print) -> LossFn:
    """The one decision on auxiliary losses, for every training stage: wrap the stage's
    ``loss_fn(model, batch) -> (loss, metrics)`` so the model's auxiliary loss of that forward
    (the MoE sequence-wise balance loss, already scaled by ``moe.seq_aux_loss_coef``) is added
    and both parts are logged (``ce_loss`` = the stage's own loss, ``aux_loss``). Models without
    one (dense, or a zero coefficient) pass through unchanged. ``enabled=False`` (the recipe key
    ``train.aux_loss: false``) trains on the stage's loss alone, and says so.

    When a loss function runs the trained model more than once per micro-batch, the balance
    loss is the last forward's (the MoE layers keep only the latest)."""
    if not enabled:
        log("train.aux_loss=false: auxiliary losses (MoE balance) are not added to the training loss")
        return loss_fn

    def loss_with_aux(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        loss, metrics = loss_fn(model, batch)
        aux_fn = getattr(unwrap(model), "aux_loss", None)
        aux = aux_fn() if callable(aux_fn) else None
        if aux is None:
            return loss, metrics
        return loss + aux.to(loss.dtype), {**(metrics or {}), "ce_loss": loss.detach(), "aux_loss": aux.detach()}

    return loss_with_aux
