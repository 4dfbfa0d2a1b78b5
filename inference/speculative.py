"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
k tokens one by one, the target model scores all of them in one forward, and the exact
acceptance rule keeps the target's output distribution unchanged:

    accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i));
    at the first rejection sample from norm(max(0, p_i - q_i)) and stop;
    if all k are accepted, sample a bonus token from p_{k+1}.

p and q are the *processed* distributions the sequence samples from (penalties,
temperature, top-k/top-p; one-hot for greedy), so greedy output equals plain greedy output.

The draft keeps its own paged cache indexed by the same block tables as the target.
"""
from __future__ import annotations

from typing import Optional

import torch

from inference import sampler
from inference.model_runner import ModelRunner
from inference.sequence import Sequence


def verify(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule for a batch, rows padded to K proposals.

    target_probs (B, K+1, V): p_1..p_{K+1}; draft_probs (B, K, V): q_1..q_K;
    draft_tokens (B, K); num_draft (B,): row b proposed only its first num_draft[b] tokens;
    uniforms (B, K) in [0, 1).
    Returns (num_accepted a (B,), residual (B, V)): the unnormalised distribution of the token
    that follows the accepted ones: max(0, p_a - q_a) after a rejection at index a, or the
    bonus p_a itself when all num_draft proposals were accepted (a == num_draft).
    """
    B, K1, V = target_probs.shape
    K = K1 - 1
    rows = torch.arange(B, device=target_probs.device)
    if K > 0:
        p_tok = target_probs[:, :K].gather(2, draft_tokens[:, :, None])[..., 0]  # (B, K)
        q_tok = draft_probs.gather(2, draft_tokens[:, :, None])[..., 0]
        ok = uniforms * q_tok < p_tok  # u < p/q without dividing by q
        ok &= torch.arange(K, device=ok.device)[None, :] < num_draft[:, None]
        num_accepted = ok.int().cumprod(1).sum(1)  # leading accepts
    else:
        num_accepted = torch.zeros(B, dtype=torch.long, device=target_probs.device)
    q_ext = torch.cat([draft_probs, torch.zeros(B, 1, V, device=draft_probs.device, dtype=draft_probs.dtype)], 1)
    q_ext[rows, num_draft] = 0.0  # after the last real proposal, sample from p itself (bonus)
    p_a, q_a = target_probs[rows, num_accepted], q_ext[rows, num_accepted]
    residual = (p_a - q_a).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q exactly: rejection impossible, but be safe
    residual = torch.where(empty, p_a, residual)
    return num_accepted.long(), residual


def _histories(seqs: list[Sequence], extra: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    return [s.prompt_ids for s in seqs], [s.output_ids + e for s, e in zip(seqs, extra)]


def speculative_decode(
    seqs: list[Sequence],
    target: ModelRunner,
    draft: ModelRunner,
    k: int,
    max_model_len: int,
    copies: Optional[list[tuple[int, int]]] = None,
) -> list[tuple[list[int], torch.Tensor, int]]:
    """One decode step for running ``seqs`` with speculation; updates num_computed counters.

    Returns per sequence (new tokens (1..k+1 of them), raw target logits (n_new, V) for logprobs,
    number of tokens proposed).
    The caller appends the tokens (and may cut them at a stop token).
    """
    target.cache.copy_blocks(copies or [])
    draft.cache.copy_blocks(copies or [])
    B = len(seqs)
    # Proposals stop before max_tokens or the context end (the last token must come from p).
    ks = [max(0, min(k, s.params.max_tokens - s.num_output - 1, max_model_len - s.num_tokens)) for s in seqs]
    proposals: list[list[int]] = [[] for _ in seqs]
    draft_probs: list[list[torch.Tensor]] = [[] for _ in seqs]
    for j in range(max(ks)):
        rows = [b for b in range(B) if ks[b] > j]
        toks, starts = [], []
        for b in rows:
            s = seqs[b]
            if j == 0:  # catch the draft up on everything it has not seen (1 or 2 tokens)
                toks.append(s.token_ids[s.num_draft_computed :])
                starts.append(s.num_draft_computed)
            else:
                toks.append([proposals[b][-1]])
                starts.append(s.num_tokens + j - 1)
        logits = draft.run(toks, [seqs[b].block_table for b in rows], starts)
        sub = [seqs[b] for b in rows]
        processed = sampler.processed_logits(logits, [s.params for s in sub], *_histories(sub, [proposals[b] for b in rows]))
        probs = sampler.probs_from_logits(processed, [s.params for s in sub])
        for r, b in enumerate(rows):
            s = seqs[b]
            if s.params.greedy:
                tok = int(probs[r].argmax())
            else:
                noise = sampler.exponential_noise([s.generator], probs.shape[1], probs.device)[0]
                tok = int(sampler.sample_from_probs(probs[r : r + 1], noise[None])[0])
            proposals[b].append(tok)
            draft_probs[b].append(probs[r])

    # Target scores the last real token and every proposal in one forward.
    toks = [[s.token_ids[-1]] + proposals[b] for b, s in enumerate(seqs)]
    logits = target.run(toks, [s.block_table for s in seqs], [s.num_computed for s in seqs], all_positions=True)
    K = max(ks)
    V = logits.shape[-1]
    # p_i for every row and position i <= K, each with its own history (penalties see the
    # proposals before it); positions past a row's proposals repeat its last one (ignored).
    flat_b, flat_i, flat_params, flat_prompts, flat_outputs = [], [], [], [], []
    for b, s in enumerate(seqs):
        for i in range(K + 1):
            n = min(i, ks[b])
            flat_b.append(b)
            flat_i.append(n)
            flat_params.append(s.params)
            flat_prompts.append(s.prompt_ids)
            flat_outputs.append(s.output_ids + proposals[b][:n])
    raw = logits[torch.tensor(flat_b, device=logits.device), torch.tensor(flat_i, device=logits.device)]  # (B*(K+1), V)
    processed = sampler.processed_logits(raw, flat_params, flat_prompts, flat_outputs)
    p = sampler.probs_from_logits(processed, flat_params).view(B, K + 1, V)
    q = torch.zeros(B, K, V, device=logits.device)
    d = torch.zeros(B, K, dtype=torch.long, device=logits.device)
    u = torch.full((B, K), 0.5, device=logits.device)
    for b, s in enumerate(seqs):
        if ks[b]:
            q[b, : ks[b]] = torch.stack(draft_probs[b])
            d[b, : ks[b]] = torch.tensor(proposals[b], device=logits.device)
            if not s.params.greedy:
                u[b, : ks[b]] = torch.rand(ks[b], generator=s.generator).to(logits.device)
    num_acc, residual = verify(p, q, d, torch.tensor(ks, device=logits.device), u)

    results = []
    for b, s in enumerate(seqs):
        a = int(num_acc[b])
        if s.params.greedy:
            last = int(residual[b].argmax())
        else:
            noise = sampler.exponential_noise([s.generator], V, residual.device)
            last = int(sampler.sample_from_probs(residual[b : b + 1], noise)[0])
        new = proposals[b][:a] + [last]
        # Target K/V is valid for the old last token and the accepted proposals; the draft's
        # for everything it saw up to the last accepted proposal it computed.
        s.num_computed = s.num_tokens + a
        if ks[b]:
            s.num_draft_computed = s.num_tokens + min(a, ks[b] - 1)
        results.append((new, logits[b, : a + 1], ks[b]))
    return results


def load_draft(path: str, target: torch.nn.Module, tokenizer, device, dtype=None) -> torch.nn.Module:
    """The draft model of ``path`` (through model/load.py) for ``target``: refused with a clear
    error unless it speaks the same tokenizer (same vocabulary size and, when the draft carries its
    tokenizer, the same tokenizer.json)."""
    from model.load import load_model, tokenizer_path
    from utils.errors import UserError
    from utils.fs import file_hash

    draft = load_model(path, device=device, dtype=dtype, expect="lm")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(f"draft {path} has vocab_size {draft.cfg.vocab_size}, the target {target.cfg.vocab_size}; "
                        "speculative decoding needs a draft trained with the same tokenizer.")
    own = tokenizer_path(path, required=False)
    if own is not None and tokenizer is not None and file_hash(own) != tokenizer.hash:
        raise UserError(f"draft {path} carries another tokenizer than the target ({own}); speculative decoding "
                        "needs the same tokenizer.")
    return draft
