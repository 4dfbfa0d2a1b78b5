"""Online RL on the one training loop: a rollout phase that fills a buffer, a resumable
iterator that serves the buffer as micro-batches for ``epochs`` passes, and the per-algorithm
batch losses (PPO, GRPO, GSPO, RFT).

    phase = RolloutPhase(...)                       # rollout index -> (buffer, stats)
    batches = RolloutBatches(phase, rows_per_micro, epochs, seed)
    train(model, batches, make_rl_loss(...), ...)   # utils/train_loop.py, unchanged

The loop pulls micro-batches; when the buffer is used up, the iterator runs the next rollout
phase with the live policy (so "rollout -> optimise -> rollout" needs no second loop, and the
optimizer, schedule, logging and checkpoints stay the loop's). The iterator's state carries
the rollout counter, the position in the buffer and the buffer itself, so a resumed run
continues exactly where it stopped.

Buffers hold per-row tensors; per-token ones live on the *shifted* grid (N, L-1): column j
is about token j+1, predicted from the prefix tokens[:, :j+1] (logits position j, critic
value V(s_j) read at position j).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from align import losses
from align.advantages import gae, group_advantages, whiten
from model.heads import ScalarHeadModel
from align.logprobs import masked_mean, sequence_logprobs, target_logprobs
from align.rewards import gsm8k_exact
from align.rollout import Rollout, generate_rollouts, make_engine, rule_rewards


class ActorCritic(nn.Module):
    """PPO's two networks as one module, so the loop trains (and DDP syncs) both in one
    forward: idx (B, T) -> (logits (B, T, V), values (B, T))."""

    def __init__(self, actor: nn.Module, critic: ScalarHeadModel):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.cfg = actor.cfg

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.actor(idx), self.critic(idx)

    def aux_loss(self) -> Optional[Tensor]:
        """Both networks' auxiliary losses (MoE balance), for model/loss.py's add_aux_loss."""
        parts = [a for a in (self.actor.aux_loss(), self.critic.aux_loss()) if a is not None]
        return torch.stack(parts).sum() if parts else None


@torch.no_grad()
def _chunked(fn: Callable[[Tensor], Tensor], tokens: Tensor, chunk: int) -> Tensor:
    return torch.cat([fn(tokens[i : i + chunk]) for i in range(0, tokens.shape[0], chunk)])


def _last_token(mask: Tensor) -> Tensor:
    """(B,) index of the last set column of each row (0 for an empty row)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, cols, torch.zeros_like(cols)).amax(dim=1)


class RolloutPhase:
    """One rollout phase: sample through the engine, score, and build the training buffer.

    Calling it with the rollout index r returns (buffer, stats): ``buffer`` maps names to
    (N, ...) CPU tensors (tokens, mask, old_logp, ref_logp, advantages, ...; what the
    algorithm's loss needs), ``stats`` maps names to floats for the log.
    """

    def __init__(self, *, algorithm: str, policy: nn.Module, reference: nn.Module, critic: Optional[ScalarHeadModel],
                 score_fn: Callable[[Rollout, list[str]], Tensor], prompts: Sequence[list[int]], answers: Sequence[str],
                 sampling: Any, group_size: int, prompts_per_rollout: int, stop_ids: Sequence[int], tokenizer: Any,
                 engine_kwargs: dict, rl: Any, chunk: int, seed: int, device: torch.device,
                 autocast: Callable[[], Any] = contextlib.nullcontext, rank: int = 0, world_size: int = 1,
                 log: Callable[[str], None] = print, on_policy: bool = False):
        self.algorithm, self.policy, self.reference, self.critic = algorithm, policy, reference, critic
        self.score_fn, self.prompts, self.answers = score_fn, list(prompts), list(answers)
        self.sampling, self.G, self.P = sampling, group_size, prompts_per_rollout
        self.stop_ids, self.tokenizer, self.engine_kwargs = list(stop_ids), tokenizer, engine_kwargs
        self.rl, self.chunk, self.seed, self.device, self.autocast = rl, chunk, seed, device, autocast
        self.rank, self.world_size, self.log = rank, world_size, log
        # on_policy: each buffer feeds exactly one optimizer step, taken right after the rollout
        # (rl.epochs 1, the whole buffer in one step), so the policy the GRPO/GSPO loss runs IS
        # the one that sampled: its detached log-probs are pi_old, and the forward over the
        # buffer that would compute them here is skipped (as TRL does when num_iterations=1).
        self.skip_old_logp = on_policy and algorithm in ("grpo", "gspo")

    def prompt_indices(self, r: int) -> list[int]:
        """Prompts of rollout r on this rank: consecutive slices of a seeded shuffle,
        reshuffled each pass over the prompt set; ranks take disjoint slices."""
        n, out = len(self.prompts), []
        for i in range(self.P):
            epoch, j = divmod((r * self.world_size + self.rank) * self.P + i, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(perm[j]))
        return out

    @torch.no_grad()
    def __call__(self, r: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        idx = self.prompt_indices(r)
        was_training = self.policy.training
        self.policy.eval()
        engine = make_engine(self.policy, self.tokenizer, **self.engine_kwargs)  # fresh: no stale prefix cache
        ro = generate_rollouts(engine, [self.prompts[i] for i in idx], self.sampling, self.G, self.stop_ids,
                               self.tokenizer, seed=self.seed + 7919 * (r * self.world_size + self.rank))
        del engine
        answers = [self.answers[idx[int(p)]] for p in ro.prompt_index]
        rewards = self.score_fn(ro, answers).float()  # (N,)
        correct = rule_rewards(ro.texts, answers, gsm8k_exact) if all(answers) else torch.zeros_like(rewards)

        tokens = ro.tokens.to(self.device)
        mask = ro.response_mask[:, 1:].to(self.device)  # (N, L-1) shifted grid
        c, T = self.chunk, self.sampling.temperature
        # Rows in length order, each chunk cut to its longest row: the buffer is padded to the
        # longest row of the whole rollout, and the padding would cost a full forward otherwise.
        order = _last_token(mask).argsort(stable=True)
        chunks = [order[i : i + c] for i in range(0, len(order), c)]

        def logps(model: nn.Module) -> Tensor:
            out = torch.zeros(mask.shape, device=mask.device)
            for rows in chunks:
                w = int(_last_token(mask[rows]).max()) + 1  # shifted-grid columns these rows need
                out[rows, :w] = target_logprobs(model, tokens[rows, : w + 1], mask[rows, :w], T).float()
            return out

        with self.autocast():
            old_logp = None if self.skip_old_logp else logps(self.policy)
            ref_logp = logps(self.reference)
            values = _chunked(lambda t: self.critic(t[:, :-1]), tokens, c) if self.critic is not None else None
        self.policy.train(was_training)

        stats = {
            "rollout": float(r + 1),
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "accuracy": correct.mean().item(),
            "response_len": ro.response_lengths.float().mean().item(),
            "truncated": ro.truncated.float().mean().item(),
        }
        buffer = {"tokens": tokens, "mask": mask}
        if old_logp is not None:  # else the loss reports kl_ref from its own log-probs
            stats["kl_ref"] = masked_mean(old_logp - ref_logp, mask).item()  # k1 estimate of KL(pi || ref)
            buffer["old_logp"] = old_logp
        if self.algorithm in ("grpo", "gspo"):
            buffer["advantages"] = group_advantages(rewards, self.G, scale=self.rl.scale_rewards).to(self.device)
            if self.algorithm == "grpo":
                buffer["ref_logp"] = ref_logp
            stats["zero_std_groups"] = (rewards.view(-1, self.G).std(dim=1) == 0).float().mean().item()
        elif self.algorithm == "ppo":
            buffer.update(self._ppo_targets(rewards.to(self.device), mask, old_logp, ref_logp, values.float()))
        else:  # rft: each group's best completion, kept only when good enough
            best = rewards.view(-1, self.G).argmax(dim=1) + torch.arange(len(idx)) * self.G  # (P,)
            keep = (rewards[best] >= self.rl.rft_min_reward).to(self.device)
            buffer = {"tokens": tokens[best], "mask": mask[best] & keep.unsqueeze(1)}
            stats["kept"] = keep.float().mean().item()
        if self.rank == 0:
            self.log(" | ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        return {k: v.cpu() for k, v in buffer.items()}, stats

    def _ppo_targets(self, scores: Tensor, mask: Tensor, old_logp: Tensor, ref_logp: Tensor, values: Tensor) -> dict:
        """Per-token rewards (-kl_coef * KL, plus the score on the last response token), GAE
        advantages (whitened) and value targets."""
        rl = self.rl
        token_rewards = -rl.kl_coef * (old_logp - ref_logp)  # (N, L-1), 0 off the mask
        last = _last_token(mask)
        has_tokens = mask.any(dim=1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        token_rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens]
        values = torch.where(mask, values, torch.zeros_like(values))
        advantages, returns = gae(token_rewards, values, mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = whiten(advantages, mask)
        return {"advantages": advantages, "returns": returns, "old_values": values}


class RolloutBatches:
    """Resumable micro-batch iterator over rollout buffers (see the module docstring).

    Each buffer is served ``epochs`` times, each pass in a fresh seeded order, in
    micro-batches of ``rows_per_micro`` rows, trimmed to their longest row. Every micro-batch
    also carries the phase's ``stats`` (0-d tensors) so the loss can log them.

    ``one_step=True`` (the whole buffer is one optimizer step, epochs 1): the micro-batches
    then only split a sum, so they are cut from rows in length order (least padding), not
    shuffled; the step's gradient is the same.
    """

    def __init__(self, phase: Callable[[int], tuple[dict, dict]], rows_per_micro: int, epochs: int, seed: int,
                 one_step: bool = False):
        self.phase, self.rows, self.epochs, self.seed = phase, rows_per_micro, epochs, seed
        self.one_step = one_step and epochs == 1
        self.rollout, self.pos = 0, 0
        self.buffer: Optional[dict[str, Tensor]] = None
        self.stats: dict[str, float] = {}
        self.plan: list[Tensor] = []

    def _make_plan(self) -> list[Tensor]:
        n = self.buffer["tokens"].shape[0]
        plan = []
        for e in range(self.epochs):
            g = torch.Generator().manual_seed(self.seed + 1000 * (self.rollout - 1) + e)
            perm = _last_token(self.buffer["mask"]).argsort(stable=True) if self.one_step else torch.randperm(n, generator=g)
            plan += [perm[i : i + self.rows] for i in range(0, n, self.rows)]
        return plan

    def __iter__(self) -> "RolloutBatches":
        return self

    def __next__(self) -> dict:
        if self.buffer is None or self.pos >= len(self.plan):
            self.buffer, self.stats = self.phase(self.rollout)
            self.rollout += 1
            self.plan, self.pos = self._make_plan(), 0
        rows = self.plan[self.pos]
        self.pos += 1
        batch = {k: v[rows] for k, v in self.buffer.items()}
        # Trim right padding: keep columns up to the longest response in these rows.
        width = int(_last_token(batch["mask"]).max()) + 1  # shifted-grid columns needed
        for k, v in batch.items():
            if v.dim() == 2:
                batch[k] = v[:, : width + 1] if k == "tokens" else v[:, :width]
        batch["stats"] = {k: torch.tensor(v) for k, v in self.stats.items()}
        return batch

    def state_dict(self) -> dict:
        return {"rollout": self.rollout, "pos": self.pos, "buffer": self.buffer, "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.rollout, self.pos = int(state["rollout"]), int(state["pos"])
        self.buffer, self.stats = state["buffer"], dict(state["stats"])
        self.plan = self._make_plan() if self.buffer is not None else []


# ----------------------------------------------------------------------------- losses


def make_rl_loss(algorithm: str, *, clip_eps: float, clip_eps_high: Optional[float] = None, kl_beta: float = 0.0,
                 aggregation: str = "token", vf_coef: float = 0.1, vf_clip: float = 0.2,
                 temperature: float = 1.0) -> Callable:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the loop. ``temperature``: the
    rollout sampling temperature; log-probs are those of softmax(logits / temperature).

    Each returns ``loss_weight`` (response tokens, or sequences for sequence-level
    objectives), so the loop's weighted mean over micro-batches equals the objective over
    the whole optimizer batch however it is split.
    """

    def common(batch: dict, mask: Tensor, by_sequence: bool) -> dict:
        weight = mask.any(dim=1).sum() if by_sequence else mask.sum()
        return {"loss_weight": max(float(weight), 1.0), "n_tokens": int(batch["tokens"].numel()),
                "response_tokens": mask.sum(dim=1).float().mean(), **batch["stats"]}

    def old_logp(batch: dict, logp: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """pi_old: the rollout's log-probs, or (an on-policy buffer, see RolloutPhase) the
        loss's own, detached; then the k1 KL to the reference is logged from them."""
        if "old_logp" in batch:
            return batch["old_logp"], {}
        old = logp.detach()
        return old, ({"kl_ref": masked_mean(old - batch["ref_logp"], mask)} if "ref_logp" in batch else {})

    def grpo(model, batch):
        mask = batch["mask"]
        logp = target_logprobs(model, batch["tokens"], mask, temperature)
        old, kl_ref = old_logp(batch, logp, mask)
        loss, m = losses.grpo_loss(logp, old, batch["ref_logp"], batch["advantages"], mask,
                                   clip_eps, kl_beta, aggregation, clip_eps_high)
        return loss, {**m, **kl_ref, **common(batch, mask, aggregation == "sequence")}

    def gspo(model, batch):
        mask = batch["mask"]
        logp = target_logprobs(model, batch["tokens"], mask, temperature)
        old, _ = old_logp(batch, logp, mask)
        loss, m = losses.gspo_loss(logp, old, batch["advantages"], mask, clip_eps, clip_eps_high)
        return loss, {**m, **common(batch, mask, True)}

    def ppo(model, batch):
        mask = batch["mask"]
        tokens = batch["tokens"]
        logits, values = model(tokens[:, :-1])
        logp = sequence_logprobs(logits / temperature if temperature != 1.0 else logits, tokens[:, 1:], mask)
        policy_loss, pm = losses.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip_eps, clip_eps_high)
        value_loss, vm = losses.ppo_value_loss(values.float(), batch["old_values"], batch["returns"], mask, vf_clip)
        loss = policy_loss + vf_coef * value_loss
        return loss, {**pm, **vm, "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                      **common(batch, mask, False)}

    def rft(model, batch):
        mask = batch["mask"]
        nll = -masked_mean(target_logprobs(model, batch["tokens"], mask), mask)
        return nll, {"nll": nll.detach(), **common(batch, mask, False)}

    fns = {"grpo": grpo, "gspo": gspo, "ppo": ppo, "rft": rft}
    if algorithm not in fns:
        raise ValueError(f"unknown online algorithm {algorithm!r}")
    return fns[algorithm]


