"""Sampler: logits -> next tokens. Pure functions over (B, V) tensors, one row per sequence.

Order (as HF / vLLM): penalties on raw logits, then greedy rows take the argmax; the rest
are divided by temperature, filtered by top-k then top-p, and sampled.

Sampling uses the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) draws i with
probability p_i (it is the Gumbel-max trick on log p). Each row draws its noise from its own
torch.Generator, so a seeded sequence gets the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from inference.sampling_params import SamplingParams


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: Seq[Seq[int]],
    output_ids: Seq[Seq[int]],
    repetition: Seq[float],
    presence: Seq[float],
    frequency: Seq[float],
) -> torch.Tensor:
    """logits (B, V) -> penalised logits (B, V), a new tensor.

    repetition (CTRL, Keskar et al. 2019; HF): for every token seen in prompt or output,
    a positive logit is divided by the penalty, a negative one multiplied.
    presence / frequency (OpenAI): logit -= presence * [count > 0] + frequency * count,
    counting the output tokens only.
    """
    B, V = logits.shape
    out = logits.clone()
    dev = logits.device
    rep = torch.tensor(repetition, dtype=out.dtype, device=dev)[:, None]
    pres = torch.tensor(presence, dtype=out.dtype, device=dev)[:, None]
    freq = torch.tensor(frequency, dtype=out.dtype, device=dev)[:, None]
    counts = torch.zeros(B, V, dtype=out.dtype, device=dev)
    seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
    for b in range(B):
        if output_ids[b]:
            ids = torch.tensor(output_ids[b], dtype=torch.long, device=dev)
            counts[b].index_add_(0, ids, torch.ones(len(ids), dtype=out.dtype, device=dev))
        if repetition[b] != 1.0:
            ids = torch.tensor(list(prompt_ids[b]) + list(output_ids[b]), dtype=torch.long, device=dev)
            seen[b, ids] = True
    penalised = torch.where(out > 0, out / rep, out * rep)
    out = torch.where(seen, penalised, out)
    return out - pres * (counts > 0).to(out.dtype) - freq * counts


def top_k_top_p_filter(logits: torch.Tensor, top_k: Seq[int], top_p: Seq[float]) -> torch.Tensor:
    """Set to -inf every token outside the row's top-k (0 = off), then outside the smallest set
    of most likely tokens whose probability reaches top_p (1.0 = off). logits (B, V)."""
    B, V = logits.shape
    dev = logits.device
    k = torch.tensor([kk if 0 < kk < V else V for kk in top_k], device=dev)
    p = torch.tensor(top_p, dtype=torch.float32, device=dev)
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(V, device=dev)[None, :]
    remove = rank >= k[:, None]  # outside top-k
    probs = sorted_logits.masked_fill(remove, float("-inf")).float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
    remove |= mass_before >= p[:, None]  # the set already reached top_p without this token
    remove[:, 0] = False  # always keep the most likely token
    mask = torch.zeros_like(remove).scatter(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def processed_logits(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    prompt_ids: Seq[Seq[int]],
    output_ids: Seq[Seq[int]],
) -> torch.Tensor:
    """Penalties, temperature, top-k and top-p for each row; greedy rows only get penalties."""
    logits = logits.float()
    if any(sp.needs_penalties for sp in params):
        logits = apply_penalties(
            logits,
            prompt_ids,
            output_ids,
            [sp.repetition_penalty for sp in params],
            [sp.presence_penalty for sp in params],
            [sp.frequency_penalty for sp in params],
        )
    if all(sp.greedy for sp in params):
        return logits
    temp = torch.tensor([sp.temperature if not sp.greedy else 1.0 for sp in params], device=logits.device)
    logits = logits / temp[:, None]
    if any(sp.top_k > 0 or sp.top_p < 1.0 for sp in params):
        logits = top_k_top_p_filter(
            logits,
            [0 if sp.greedy else sp.top_k for sp in params],
            [1.0 if sp.greedy else sp.top_p for sp in params],
        )
    return logits


def probs_from_logits(processed: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from (B, V): softmax, or one-hot at the argmax for greedy."""
    probs = processed.softmax(-1)
    greedy = [b for b, sp in enumerate(params) if sp.greedy]
    if greedy:
        rows = torch.tensor(greedy, device=probs.device)
        one_hot = torch.zeros(len(greedy), probs.shape[1], device=probs.device)
        one_hot[torch.arange(len(greedy)), processed[rows].argmax(-1)] = 1.0
        probs[rows] = one_hot
    return probs


def exponential_noise(generators: Seq[torch.Generator], V: int, device: torch.device) -> torch.Tensor:
    """(B, V) Exp(1) noise, row b drawn from generators[b] (on CPU, so CPU generators work).

    E = -log(1 - U) with U ~ Uniform[0, 1): one generator call per row is what a decode step
    of a large sampled batch pays for, and torch.rand is ~3x faster per row than exponential_
    on CPU (128 rows x 2048: 1.9 vs 6.5 ms), the log then runs once over the whole batch."""
    uniform = torch.stack([torch.rand(V, generator=g) for g in generators])
    return (-torch.log1p(-uniform)).to(device)


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax p / E ~ Categorical(p). probs, noise (B, V) -> tokens (B,)."""
    return (probs / noise).argmax(-1)


def sample(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    prompt_ids: Seq[Seq[int]],
    output_ids: Seq[Seq[int]],
    generators: Seq[Optional[torch.Generator]],
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Greedy rows draw no randomness."""
    logits = processed_logits(logits, params, prompt_ids, output_ids)
    tokens = logits.argmax(-1)
    sampled = [b for b, sp in enumerate(params) if not sp.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = logits[rows].softmax(-1)
        noise = exponential_noise([generators[b] for b in sampled], logits.shape[1], logits.device)
        tokens[rows] = sample_from_probs(probs, noise)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Log-probabilities under the raw model distribution: per row (chosen token's logprob,
    [(token, logprob)] of the top_n most likely tokens). logits (B, V), tokens (B,)."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    if top_n:
        vals, ids = logp.topk(top_n, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in chosen]
    return list(zip(chosen, tops))
