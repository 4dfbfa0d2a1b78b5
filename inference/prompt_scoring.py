"""Prompt log-probabilities: how likely the model finds each prompt token given the ones before
it, computed in the prefill forwards that build the KV cache (what likelihood evaluation, e.g.
multiple-choice scoring through an OpenAI ``echo`` request, needs; vLLM's ``prompt_logprobs``).

Position p's hidden state predicts token p + 1, so a prefill chunk over positions [st, st + q)
scores tokens st + 1 .. st + q; the last prompt position predicts the first generated token,
which the sampler reports. The LM head runs over the scored rows a chunk at a time
(model/kernels/chunked_ce.py's chunk rule), so a long prompt's (N, V) logits never exist at once.
"""
from __future__ import annotations

from typing import Callable

import torch

from inference.outputs import TokenLogprob
from inference.sampler import token_logprobs
from inference.sequence import Sequence
from model.kernels.chunked_ce import default_chunk_size


def chunked_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, top_n: int,
                           head: Callable[[torch.Tensor], torch.Tensor], vocab_size: int) -> list[tuple[float, list]]:
    """``sampler.token_logprobs`` of given targets from final hidden states. hidden (N, d),
    targets (N,), head: hidden -> logits (the model's ``logits``, softcap included).
    Returns per row (target's logprob, [(token, logprob)] of the top_n most likely)."""
    rows = default_chunk_size(hidden.shape[0], vocab_size)
    out: list[tuple[float, list]] = []
    for start in range(0, hidden.shape[0], rows):
        out += token_logprobs(head(hidden[start : start + rows]), targets[start : start + rows], top_n)
    return out


def score_prefill(chunks: list[tuple[Sequence, int, int]], hidden: torch.Tensor, model: torch.nn.Module) -> None:
    """Append to each sequence's ``prompt_logprobs`` the prompt tokens its prefill chunk predicts.

    chunks: (sequence, first position, positions computed) per row; hidden (rows, T, d), this
    step's final hidden states of those rows (padding columns after each row's q are ignored).
    """
    parts, targets, counts = [], [], []
    for row, (seq, start, q) in enumerate(chunks):
        # These sequences never take a prefix-cache hit, so their chunks arrive in order.
        assert start == len(seq.prompt_logprobs), f"{seq}: prompt scored up to {len(seq.prompt_logprobs)}, chunk at {start}"
        end = min(start + q, seq.prompt_len - 1)  # positions start .. end-1 predict tokens start+1 .. end
        parts.append(hidden[row, : end - start])
        targets += seq.token_ids[start + 1 : end + 1]
        counts.append(end - start)
    top_n = max(seq.params.prompt_logprobs for seq, _, _ in chunks)
    target_ids = torch.tensor(targets, dtype=torch.long, device=hidden.device)
    scores = chunked_token_logprobs(torch.cat(parts), target_ids, top_n, model.logits, model.cfg.vocab_size)
    at = 0
    for (seq, _, _), n in zip(chunks, counts):
        k = seq.params.prompt_logprobs
        seq.prompt_logprobs += [TokenLogprob(t, lp, top[:k]) for t, (lp, top) in zip(targets[at : at + n], scores[at : at + n])]
        at += n
