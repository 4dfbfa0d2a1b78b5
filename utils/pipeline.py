"""Pipeline-parallel training steps on torch.distributed.pipelining (``train.parallel.pp`` > 1).

    pipe = Pipeline(model, env, n_microbatches=accum, schedule="1f1b")   # prunes model to this rank's stage
    loss, weight, tokens = pipe.step([next(batches) for _ in range(accum)])

Each rank holds one stage (``model.pipeline_stage``: its blocks; the first also the embedding,
the last the norm and head) and runs a 1F1B (``Schedule1F1B``) or GPipe (``ScheduleGPipe``)
schedule whose micro-batches are the optimizer step's gradient-accumulation micro-batches, so
a pipeline step trains on exactly the global batch one process would.

The loss is next-token cross-entropy over the step's counted targets: batches are (x, y) with
y = -100 where a target does not count, each micro-batch contributes its summed CE divided by
the count over the whole step, and the schedule does not rescale the gradients, so they are the
gradient of the step's mean loss, as in one process. (A stage's own ``loss_fn`` cannot run on
one slice of the model, so only next-token training, i.e. pretraining, takes pp.)
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.distributed import DistEnv, all_gather_object, device_mesh
from utils.errors import UserError


class Pipeline:
    def __init__(self, model: nn.Module, env: DistEnv, n_microbatches: int, schedule: str = "1f1b",
                 keep_whole: bool = False):
        """``keep_whole``: keep a copy of the whole model (before pruning) to evaluate with ``whole_model``."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if n_microbatches < env.pp:
            raise UserError(f"pp={env.pp} stages need at least {env.pp} micro-batches per optimizer step, this run has "
                            f"{n_microbatches}; raise train.global_batch_size (or global_batch_tokens) to "
                            f"{env.pp} x batch_size rows or more.")
        self.env = env
        self.whole = copy.deepcopy(model) if keep_whole else None
        self.module = model.pipeline_stage(env.pp_rank, env.pp)
        self.first, self.last = self.module.first, self.module.last
        self.group = device_mesh(env)["pp"].get_group()
        self.stage = PipelineStage(self.module, env.pp_rank, env.pp, env.device, group=self.group)
        kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
        self.schedule = kind(self.stage, n_microbatches, loss_fn=self._loss, scale_grads=False)
        self.n_targets = 1

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the step's mean: summed CE / the step's counted targets."""
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return ce / self.n_targets

    def step(self, micro_batches: list[Any]) -> tuple[float, float, int]:
        """Forward and backward over the step's micro-batches (each (x, y), on this rank's device).
        Returns this rank's (loss, weight, tokens): the step's mean loss with weight 1 on the last
        stage (0 and 0 elsewhere), the tokens processed counted on the first stage."""
        if any(len(b) != 2 for b in micro_batches):
            raise UserError("pipeline parallelism runs next-token (x, y) batches; data.document_mask (positions per "
                            "document) is not built for it: set it false or pp: 1.")
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        self.n_targets = max(int((y != -100).sum()), 1)
        if self.first:
            self.schedule.step(x)
            return 0.0, 0.0, x.numel()
        if self.last:
            losses: list[torch.Tensor] = []
            self.schedule.step(target=y, losses=losses)
            return float(sum(loss.detach() for loss in losses)), 1.0, 0
        self.schedule.step()
        return 0.0, 0.0, 0

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, gathered from every stage onto every rank (CPU copies)."""
        mine = {k: v.detach().cpu().contiguous() for k, v in self.module.model.state_dict().items()}
        merged: dict[str, torch.Tensor] = {}
        for part in all_gather_object(mine, self.env):
            merged.update(part)
        return merged

    def whole_model(self) -> nn.Module:
        """The kept copy of the whole model holding the stages' current weights (every rank evaluates it)."""
        self.whole.load_state_dict(self.full_state())
        return self.whole
