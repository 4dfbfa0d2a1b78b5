"""On-policy distillation (GKD, Agarwal et al. 2024): the student answers prompts through the
engine, and the teacher scores the student's own tokens.

    prompts = example_prompts(sft_loader, longest)                 # the data's prompts, as token ids
    samples = StudentSamples(student, prompts, rows, sampling, stop_ids, engine_kwargs, seed)
    batches = MixedBatches(data_batches, samples, ratio=0.5, seed)  # GKD's lambda: share of on-policy batches
    train(student, batches, distill_loss_fn, ...)                   # utils/train_loop.py, unchanged

Training only on the data's answers teaches the student to continue prefixes it will never write
itself; on its own samples it learns where its own mistakes lead (the exposure bias that
sequence-level KD and SFT leave). A sampled batch is {x, y, loss_mask, on_policy}: the prompt
and the student's reply (its stop token included, since it must learn to stop), counted on the
reply only; the loss then uses the divergence alone (a next-token loss on its own samples would
only reinforce them).

Each batch is sampled with the live student (the same module the loop trains) by a fresh engine,
so no cached K/V outlives an update; prompts and seeds follow from the batch number, so a resumed
run samples what the uninterrupted run would have.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.errors import UserError


def example_prompts(loader, longest: int) -> list[list[int]]:
    """The prompt of every example of an SFT split (an ``SFTLoader``): its tokens before the first
    assistant token, i.e. up to and including the generation prompt. Examples without an assistant
    token, or whose prompt is longer than ``longest``, are left out (UserError when none is left)."""
    prompts, too_long = [], 0
    for s, e in zip(loader.starts.tolist(), loader.ends.tolist()):
        answer = np.flatnonzero(loader.mask[s:e])
        if not answer.size or answer[0] == 0:
            continue
        if answer[0] > longest:
            too_long += 1
            continue
        prompts.append(loader.tokens[s:s + int(answer[0])].astype(np.int64).tolist())
    if not prompts:
        raise UserError(f"no SFT example has a prompt of at most {longest} tokens to sample answers for "
                        f"({too_long} are longer); lower onpolicy.max_new_tokens or raise train.seq_len.")
    return prompts


def pad_rows(rows: Sequence[list[int]], starts: Sequence[int]) -> dict[str, torch.Tensor]:
    """Token rows (prompt + reply) -> {x, y, loss_mask}, right-padded with 0; the mask counts the
    targets y from each row's reply start (``starts``: prompt lengths) to its end."""
    L = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    counted = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, :len(row)] = torch.tensor(row)
        counted[i, start:len(row)] = True
    return {"x": tokens[:, :-1], "y": tokens[:, 1:], "loss_mask": counted[:, 1:].float()}


class StudentSamples:
    """Batch ``i`` of on-policy rows: ``rows`` prompts (a seeded shuffle per pass over the prompts,
    ranks taking disjoint slices) answered by the live student through the engine."""

    def __init__(self, model: nn.Module, prompts: Sequence[list[int]], rows: int, sampling: Any,
                 stop_ids: Sequence[int], engine_kwargs: dict, seed: int, rank: int = 0, world_size: int = 1):
        self.model, self.prompts, self.rows, self.sampling = model, list(prompts), rows, sampling
        self.stop_ids, self.engine_kwargs, self.seed = list(stop_ids), engine_kwargs, seed
        self.rank, self.world_size = rank, world_size

    def prompt_indices(self, i: int) -> list[int]:
        n, out = len(self.prompts), []
        for j in range(self.rows):
            epoch, at = divmod((i * self.world_size + self.rank) * self.rows + j, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(perm[at]))
        return out

    @torch.no_grad()
    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        from inference.engine import LLMEngine

        idx = self.prompt_indices(i)
        was_training = self.model.training
        engine = LLMEngine(self.model.eval(), device=next(self.model.parameters()).device, **self.engine_kwargs)
        base = 7919 * (i * self.world_size + self.rank) + self.seed
        params = [replace(self.sampling, n=1, seed=base + j, stop_token_ids=self.stop_ids) for j in range(len(idx))]
        outs = engine.generate([self.prompts[j] for j in idx], params, use_tqdm=False)
        self.model.train(was_training)
        rows, starts = [], []
        for j, out in zip(idx, outs):
            reply = out.outputs[0]
            if reply.finish_reason == "error":
                raise UserError(f"the engine refused an on-policy prompt: {reply.error}")
            rows.append(self.prompts[j] + list(reply.token_ids))
            starts.append(len(self.prompts[j]))
        return {**pad_rows(rows, starts), "on_policy": torch.tensor(1.0)}


def as_dict(batch: Any) -> dict:
    """A loader's (x, y[, loss_mask]) tuple as the dict the distillation loss reads (pretraining
    windows: every target counts)."""
    if isinstance(batch, dict):
        return batch
    x, y = batch[0], batch[1]
    mask = batch[2] if len(batch) > 2 else torch.ones_like(y, dtype=torch.float32)
    return {"x": x, "y": y, "loss_mask": mask}


class MixedBatches:
    """Micro-batch i is the student's own samples with probability ``ratio`` (a draw seeded by
    (seed, i)), else the data's next batch. Resumable: the state is i and the data loader's."""

    def __init__(self, data: Iterator, samples: StudentSamples | None, ratio: float, seed: int):
        if ratio > 0 and samples is None:
            raise ValueError("MixedBatches: ratio > 0 needs a sampler")
        self.data, self.samples, self.ratio, self.seed, self.i = data, samples, ratio, seed, 0

    def __iter__(self) -> "MixedBatches":
        return self

    def __next__(self) -> dict:
        i, self.i = self.i, self.i + 1
        if self.ratio > 0 and np.random.default_rng([self.seed, i]).random() < self.ratio:
            return self.samples(i)
        return as_dict(next(self.data))

    def state_dict(self) -> dict:
        return {"i": self.i, "data": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])
        self.data.load_state_dict(state["data"])
