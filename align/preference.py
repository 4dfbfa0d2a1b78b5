"""Offline preference training: batches of pairs, sequence log-probs, cached reference
log-probs, and the per-algorithm batch losses handed to the one training loop.

Data: a ``PreferencePair`` is token ids (prompt, chosen response, rejected response), already in
the chat format. ``collate_pairs`` right-pads them into a batch dict:

    chosen_ids, rejected_ids      (B, T) long      prompt + response, right-padded with 0
    chosen_mask, rejected_mask    (B, T) bool      1 on response tokens (what is scored)
    index                         (B,)   long      position of the pair in its dataset

The reference model is run ONCE over the whole dataset before training
(``compute_reference_logps``); its log-probs are stored by example index and looked up per
batch, so training holds one model and pays one forward per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from align import losses
from align.logprobs import masked_sum, target_logprobs


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]  # response tokens only (ends with the end-of-turn token)
    rejected: list[int]


def _pad(rows: Sequence[list[int]], masks: Sequence[list[bool]]) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


def join(prompt: list[int], response: list[int]) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + response and the mask that is 1 on the response."""
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def collate_pairs(pairs: Sequence[PreferencePair], indices: Sequence[int]) -> dict[str, Tensor]:
    """Pad a list of pairs into the batch dict described in the module docstring."""
    chosen = [join(p.prompt, p.chosen) for p in pairs]
    rejected = [join(p.prompt, p.rejected) for p in pairs]
    chosen_ids, chosen_mask = _pad([c[0] for c in chosen], [c[1] for c in chosen])
    rejected_ids, rejected_mask = _pad([r[0] for r in rejected], [r[1] for r in rejected])
    return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask, "rejected_ids": rejected_ids,
            "rejected_mask": rejected_mask, "index": torch.tensor(list(indices), dtype=torch.long)}


class PairBatches:
    """Endless, resumable iterator of pair batches: a fresh seeded shuffle every epoch.

    ``state_dict()`` is (epoch, position), so a resumed run sees exactly the batches the
    uninterrupted one would. With ``rank``/``world_size`` each process takes every
    world_size-th batch of the same order.
    """

    def __init__(self, pairs: Sequence[PreferencePair], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not pairs:
            raise ValueError("no preference pairs to iterate over")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.pairs), generator=g).tolist()

    def __iter__(self) -> "PairBatches":
        return self

    def _next_indices(self) -> list[int]:
        stride = self.batch_size * self.world_size
        if self.pos + stride > len(self._order):  # drop the ragged tail; reshuffle
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffle()
        start = self.pos + self.rank * self.batch_size
        self.pos += stride
        return [self._order[(start + i) % len(self._order)] for i in range(self.batch_size)]

    def __next__(self) -> dict[str, Tensor]:
        idx = self._next_indices()
        return collate_pairs([self.pairs[i] for i in idx], idx)

    def upcoming(self, n_batches: int) -> list[int]:
        """Sorted distinct pair indices of the next ``n_batches`` batches (state unchanged):
        the pairs a run of known length will ever touch, so the reference pass can skip the rest."""
        probe = PairBatches(self.pairs, self.batch_size, self.seed, self.rank, self.world_size)
        probe.load_state_dict(self.state_dict())
        return sorted({i for _ in range(n_batches) for i in probe._next_indices()})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


# ----------------------------------------------------------------------------- log-probs


def response_logps(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the masked (response) tokens of each row, and their count.

    ids, mask (B, T). Position t of the logits predicts token t+1, so the last input
    position is never needed. Returns (logps (B,) float32, lengths (B,) float32).
    """
    target_mask = mask[:, 1:]
    logp = target_logprobs(model, ids, target_mask)  # (B, T-1), 0 off the response (head run only there)
    return masked_sum(logp, target_mask, dim=1), target_mask.sum(dim=1).float()


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """One forward over chosen and rejected stacked (2B rows); returns (B,) tensors
    chosen/rejected summed logps and response lengths."""
    B = batch["chosen_ids"].shape[0]
    T = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])
    right = lambda x: nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731  zeros = pad / not scored
    ids = torch.cat([right(batch["chosen_ids"]), right(batch["rejected_ids"])])
    mask = torch.cat([right(batch["chosen_mask"]), right(batch["rejected_mask"])])
    logps, lengths = response_logps(model, ids, mask)
    return {"chosen": logps[:B], "rejected": logps[B:], "chosen_len": lengths[:B], "rejected_len": lengths[B:]}


@dataclass
class ReferenceLogps:
    """Reference-model log-probs by example index: chosen, rejected (N,), and for KTO the
    mismatched completion (prompt i with the chosen response of example (i+1) mod N)."""

    chosen: Tensor
    rejected: Tensor
    mismatched: Optional[Tensor] = None


def mismatched_batch(pairs: Sequence[PreferencePair], indices: Sequence[int]) -> dict[str, Tensor]:
    """KTO's KL batch: prompt i paired with the chosen response of example (i+1) mod N.

    A fixed partner (rather than a shuffle within the batch) makes the reference side
    cacheable by index; the estimate is still of E_x KL(pi(.|x) || ref(.|x)) over
    responses that do not answer x."""
    n = len(pairs)
    rows = [join(pairs[i].prompt, pairs[(i + 1) % n].chosen) for i in indices]
    ids, mask = _pad([r[0] for r in rows], [r[1] for r in rows])
    return {"ids": ids, "mask": mask}


@torch.no_grad()
def compute_reference_logps(ref_model: nn.Module, pairs: Sequence[PreferencePair], batch_size: int,
                            device: torch.device, mismatched: bool = False,
                            indices: Optional[Sequence[int]] = None) -> ReferenceLogps:
    """Run the frozen reference once over the pairs (all, or only ``indices``), in eval mode
    without grad. Returns (N,) tensors; entries of pairs not computed hold NaN, so a lookup
    of a pair outside ``indices`` poisons the loss instead of passing silently."""
    was_training = ref_model.training
    ref_model.eval()
    todo = list(range(len(pairs))) if indices is None else list(indices)
    out = ReferenceLogps(torch.full((len(pairs),), float("nan")), torch.full((len(pairs),), float("nan")),
                         torch.full((len(pairs),), float("nan")) if mismatched else None)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in idx], idx).items()}
        logps = pair_logps(ref_model, batch)
        out.chosen[idx], out.rejected[idx] = logps["chosen"].cpu(), logps["rejected"].cpu()
        if mismatched:
            mb = mismatched_batch(pairs, idx)
            out.mismatched[idx] = response_logps(ref_model, mb["ids"].to(device), mb["mask"].to(device))[0].cpu()
    ref_model.train(was_training)
    return out


# ----------------------------------------------------------------------------- batch losses

LossFn = Callable[[nn.Module, dict], tuple[Tensor, dict]]


def reward_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """Bradley-Terry loss of a ScalarHeadModel: its score after the last real token."""
    B = batch["chosen_ids"].shape[0]
    T = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])
    right = lambda x: nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731
    ids = torch.cat([right(batch["chosen_ids"]), right(batch["rejected_ids"])])
    lengths = torch.cat([_real_lengths(batch["chosen_mask"]), _real_lengths(batch["rejected_mask"])])
    values = model(ids)  # (2B, T)
    scores = values.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    return losses.reward_pairwise_loss(scores[:B], scores[B:])


def _real_lengths(mask: Tensor) -> Tensor:
    """Length of prompt + response of each right-padded row: one past the last response token."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions + 1, torch.zeros_like(positions)).amax(dim=1)


def make_preference_loss(
    algorithm: str,
    *,
    beta: float,
    ref: Optional[ReferenceLogps] = None,
    pairs: Optional[Sequence[PreferencePair]] = None,
    label_smoothing: float = 0.0,
    dpo_loss_type: str = "sigmoid",
    orpo_lambda: float = 0.1,
    simpo_gamma: float = 0.5,
    kto_desirable_weight: float = 1.0,
    kto_undesirable_weight: float = 1.0,
) -> LossFn:
    """The ``loss_fn(model, batch) -> (loss, metrics)`` of one offline algorithm.

    dpo and kto need ``ref`` (cached reference log-probs by index); kto also needs ``pairs``
    (to build its mismatched KL batch). orpo and simpo are reference-free.
    """
    if algorithm == "reward":
        return reward_loss
    if algorithm in ("dpo", "kto") and ref is None:
        raise ValueError(f"{algorithm} needs cached reference log-probs")

    def cached(i: Tensor, *tables: Tensor) -> None:
        if any(torch.isnan(t[i]).any() for t in tables):
            raise RuntimeError(f"reference log-probs of pairs {i.tolist()} were not precomputed "
                               "(compute_reference_logps(indices=...) must cover every batch the run sees)")

    def dpo(model, batch):
        out = pair_logps(model, batch)
        i = batch["index"].cpu()
        cached(i, ref.chosen, ref.rejected)
        dev = out["chosen"].device
        return losses.dpo_loss(out["chosen"], out["rejected"], ref.chosen[i].to(dev), ref.rejected[i].to(dev),
                               beta, label_smoothing, dpo_loss_type)

    def orpo(model, batch):
        out = pair_logps(model, batch)
        chosen_avg = out["chosen"] / out["chosen_len"].clamp(min=1)
        rejected_avg = out["rejected"] / out["rejected_len"].clamp(min=1)
        return losses.orpo_loss(-chosen_avg, chosen_avg, rejected_avg, orpo_lambda)

    def simpo(model, batch):
        out = pair_logps(model, batch)
        return losses.simpo_loss(out["chosen"] / out["chosen_len"].clamp(min=1),
                                 out["rejected"] / out["rejected_len"].clamp(min=1), beta, simpo_gamma)

    def kto(model, batch):
        # Each pair gives two unpaired examples: chosen is desirable, rejected undesirable.
        out = pair_logps(model, batch)
        i = batch["index"].cpu()
        cached(i, ref.chosen, ref.rejected, ref.mismatched)
        dev = out["chosen"].device
        pi = torch.cat([out["chosen"], out["rejected"]])
        ref_logps = torch.cat([ref.chosen[i], ref.rejected[i]]).to(dev)
        desirable = torch.cat([torch.ones_like(i, dtype=torch.bool), torch.zeros_like(i, dtype=torch.bool)]).to(dev)
        with torch.no_grad():  # z0 is a baseline, not something to differentiate through
            mb = mismatched_batch(pairs, i.tolist())
            pi_kl = response_logps(model, mb["ids"].to(dev), mb["mask"].to(dev))[0]
            kl = (pi_kl - ref.mismatched[i].to(dev)).mean()
        return losses.kto_loss(pi, ref_logps, desirable, kl, beta, kto_desirable_weight, kto_undesirable_weight)

    fns = {"dpo": dpo, "orpo": orpo, "simpo": simpo, "kto": kto}
    if algorithm not in fns:
        raise ValueError(f"unknown offline algorithm {algorithm!r}")
    return fns[algorithm]


# ----------------------------------------------------------------------------- held-out accuracy


@torch.no_grad()
def preference_accuracy(model: nn.Module, pairs: Sequence[PreferencePair], ref: ReferenceLogps,
                        batch_size: int, device: torch.device, reward_model: bool = False) -> dict[str, float]:
    """Held-out accuracy of a policy (or reward model) on preference pairs.

    Policy: ``pref_accuracy`` is the share of pairs whose chosen log-ratio
    log pi/pi_ref exceeds the rejected one (the implicit DPO reward; ties count half, so a
    policy equal to its reference scores 0.5); ``logp_accuracy`` compares length-averaged
    log-probs alone (does the model itself prefer the chosen reply?).
    Reward model: ``pref_accuracy`` is the share with score(chosen) > score(rejected).
    """
    was_training = model.training
    model.eval()
    wins, avg_wins, margins = [], [], []
    for start in range(0, len(pairs), batch_size):
        idx = list(range(start, min(start + batch_size, len(pairs))))
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in idx], idx).items()}
        if reward_model:
            _, m = reward_loss(model, batch)
            wins.append(m["accuracy"].item() * len(idx))
            margins.append(m["margin"].item() * len(idx))
            continue
        out = pair_logps(model, batch)
        i = torch.tensor(idx)
        h = (out["chosen"].cpu() - ref.chosen[i]) - (out["rejected"].cpu() - ref.rejected[i])  # (b,)
        wins.append(((h > 0).float() + 0.5 * (h == 0).float()).sum().item())
        margins.append(h.sum().item())
        avg_c, avg_r = out["chosen"] / out["chosen_len"].clamp(min=1), out["rejected"] / out["rejected_len"].clamp(min=1)
        avg_wins.append((avg_c > avg_r).float().sum().item())
    model.train(was_training)
    n = len(pairs)
    result = {"pref_accuracy": sum(wins) / n, "margin": sum(margins) / n, "n_pairs": n}
    if not reward_model:
        result["logp_accuracy"] = sum(avg_wins) / n
    return result
