"""Log-probabilities of *given* tokens, with plain batched forward passes.

The engine (inference/) samples new tokens; it does not return log-probabilities of a
continuation we choose (prompt logprobs). MMLU letter scoring and perplexity need exactly
that, so they run the model directly. Sequences of different lengths are right-padded
into one batch: under the causal mask a real token never attends to the padding after it,
so its logits equal those of the unpadded sequence, and only real positions are read.

Only the hidden states at the positions we score go through the lm_head, so the
(B, T, vocab) logits tensor is never built.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _padded(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, T_max) ids; also returns lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def _chunks(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[range]:
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        yield range(s, min(s + batch_size, n))


@torch.inference_mode()
def next_token_logits(model: torch.nn.Module, prompts: Sequence[Sequence[int]], batch_size: int = 8,
                      pad_id: int = 0, progress: bool = False) -> torch.Tensor:
    """Logits of the token after each prompt.

    Args:
        model: a Transformer (forward(idx, return_hidden=True) and .logits(hidden)).
        prompts: N non-empty token-id lists, each no longer than the model's context.
    Returns:
        (N, V) float32 logits at each prompt's last real position, in prompt order.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("next_token_logits: empty prompt")
    device = _device(model)
    # Longest first: similar lengths share a batch, so little compute goes into padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for rows in _chunks(len(order), batch_size, progress, "score"):
        idx = [order[r] for r in rows]
        ids, lengths = _padded([prompts[i] for i in idx], pad_id, device)
        hidden = model(ids, return_hidden=True)  # (B, T, d_model)
        last = hidden[torch.arange(len(idx), device=device), lengths - 1]  # (B, d_model)
        logits = model.logits(last).float().cpu()  # (B, V)
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return torch.stack(out)


@torch.inference_mode()
def continuation_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], batch_size: int = 8,
                          pad_id: int = 0, progress: bool = False) -> torch.Tensor:
    """log P(continuation | context), summed over the continuation's tokens.

    Args:
        contexts, continuations: N pairs of non-empty token-id lists; context + continuation
            minus its last token (a target only) must fit the model's context.
    Returns:
        (N,) float32 summed log-probabilities.
    """
    device = _device(model)
    if any(len(c) == 0 for c in contexts) or any(len(x) == 0 for x in continuations):
        raise ValueError("continuation_logprobs: empty context or continuation")
    # The continuation's last token is only a target, never an input.
    seqs = [list(c) + list(x)[:-1] for c, x in zip(contexts, continuations, strict=True)]
    out = torch.empty(len(seqs))
    for rows in _chunks(len(seqs), batch_size, progress, "score"):
        ids, _ = _padded([seqs[i] for i in rows], pad_id, device)
        hidden = model(ids, return_hidden=True)  # (B, T, d_model)
        for j, i in enumerate(rows):
            n_ctx, n_cont = len(contexts[i]), len(continuations[i])
            # position p predicts token p + 1: the continuation is predicted from n_ctx-1 .. n_ctx+n_cont-2
            logits = model.logits(hidden[j, n_ctx - 1 : n_ctx + n_cont - 1]).float()  # (n_cont, V)
            target = torch.as_tensor(list(continuations[i]), dtype=torch.long, device=device)
            out[i] = -F.cross_entropy(logits, target, reduction="sum").cpu()
    return out


# ----------------------------------------------------------------------------- perplexity

def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows that score every token 1..n_tokens-1 exactly once (token 0 has no context).

    Each step scores the next `stride` targets; its input is the `window` tokens just before
    the last of them, so every target sees as much context as fits (the HF perplexity-with-
    stride method: with stride < window a scored token has >= window - stride tokens of
    context, except near the start where it has all of them).

    Returns:
        [(begin, end, first)]: feed tokens[begin:end]; local position j predicts token
        begin + j + 1; positions j >= first are scored (the earlier ones are context only).
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    out = []
    t0 = 1  # first target not scored yet
    while t0 < n_tokens:
        t1 = min(t0 + stride, n_tokens)  # score targets t0 .. t1-1
        begin = max(0, t1 - 1 - window)
        out.append((begin, t1 - 1, t0 - begin - 1))
        t0 = t1
    return out


@torch.inference_mode()
def sliding_window_nll(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor | Sequence[int], window: int,
                       stride: int, batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """Negative log-likelihood (nats) of every token after the first, each scored once.

    Args:
        tokens: (N,) token ids of one stream (documents joined by EOS).
        window: input length of one forward pass (<= the model's context).
        stride: new tokens scored per window (<= window); smaller = more context, more compute.
    Returns:
        (N - 1,) float32: entry t - 1 is -log p(tokens[t] | its context); perplexity = exp(mean).
    """
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    windows = sliding_windows(len(tokens), window, stride)
    device = _device(model)
    nll = np.zeros(max(len(tokens) - 1, 0), dtype=np.float32)
    for rows in _chunks(len(windows), batch_size, progress, "perplexity"):
        ids, _ = _padded([tokens[windows[i][0] : windows[i][1]] for i in rows], 0, device)
        hidden = model(ids, return_hidden=True)  # (B, T, d_model)
        for j, i in enumerate(rows):
            begin, end, first = windows[i]
            logits = model.logits(hidden[j, first : end - begin]).float()  # (n_scored, V)
            target = tokens[begin + first + 1 : end + 1].to(device)
            # targets are tokens begin+first+1 .. end, stored at index target - 1
            nll[begin + first : end] = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
    return nll
