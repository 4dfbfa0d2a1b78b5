"""Knowledge-distillation losses: how far the student's next-token distribution is from the teacher's.

Three divergences between the teacher P and the student Q over the next token (GKD, Agarwal et al.
2024, Eq. 1), each a pure function of log-probabilities (..., K) -> (...,):

    forward KL   KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))     mean-seeking: Q spreads over all of P
    reverse KL   KL(Q || P) = sum_v Q(v) (log Q(v) - log P(v))     mode-seeking: Q settles on P's modes
    JSD(beta)    beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q

JSD(beta) / beta -> forward KL as beta -> 0 and JSD(beta) / (1 - beta) -> reverse KL as beta -> 1;
beta = 0 and beta = 1 mean those two KLs themselves (as TRL's GKDTrainer reads them).

Temperature T softens both distributions (softmax(z / T)) and the divergence is multiplied by T^2
(Hinton et al. 2015), so its gradients keep their size as T changes; it mixes with the ordinary
next-token cross-entropy (at T = 1) by ``kd_weight``:

    loss per token = kd_weight * T^2 * D(P_T, Q_T) + (1 - kd_weight) * CE(Q, y)

The teacher comes as full logits (computed on the fly) or as its top-k (cached to disk): the k
most likely tokens' log-probs and the log of the mass left over, the tail. Against a top-k teacher
both distributions are compared over k + 1 outcomes, the k tokens and "any other token" (the
student's share of it is its mass outside the k). All three divergences are f-divergences, so this
coarser view never exceeds the full one, and with k = V it is the full one.

``distill_loss`` runs this over the counted rows in chunks: each chunk's (C, V) student and teacher
logits exist only inside a checkpointed function (recomputed in backward), so the (N, V) logits of
neither model are ever held, whatever head the student has (LoRA, soft-capped, tied).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


# ----------------------------------------------------------------------------- divergences


def forward_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) over the last dim; logp the teacher's log-probs, logq the student's."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reverse_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(Q || P) over the last dim."""
    return (logq.exp() * (logq - logp)).sum(-1)


def generalized_jsd(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    """beta KL(P || M) + (1 - beta) KL(Q || M) with M = beta P + (1 - beta) Q, over the last dim.
    beta = 0 is forward KL and beta = 1 reverse KL (the limits of JSD/beta and JSD/(1-beta))."""
    if beta == 0.0:
        return forward_kl(logp, logq)
    if beta == 1.0:
        return reverse_kl(logp, logq)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))  # log M, without leaving log space
    return beta * forward_kl(logp, logm) + (1 - beta) * forward_kl(logq, logm)


def divergence(kind: Divergence, logp: Tensor, logq: Tensor, beta: float = 0.5) -> Tensor:
    """One of the three divergences by name (the recipe's ``loss.divergence``)."""
    if kind == "forward_kl":
        return forward_kl(logp, logq)
    if kind == "reverse_kl":
        return reverse_kl(logp, logq)
    if kind == "jsd":
        return generalized_jsd(logp, logq, beta)
    raise ValueError(f"unknown divergence {kind!r}; one of {DIVERGENCES}")


# ----------------------------------------------------------------------------- a top-k teacher


@dataclass
class TopK:
    """A teacher's next-token distribution at temperature T, kept to its k most likely tokens.

    logp   (N, k) float32  log P_T(v) of the k tokens, most likely first
    index  (N, k) int64    their token ids
    tail   (N,)   float32  log of the mass of every other token (-inf when k = V)
    """

    logp: Tensor
    index: Tensor
    tail: Tensor

    def __getitem__(self, rows) -> "TopK":
        return TopK(self.logp[rows], self.index[rows], self.tail[rows])


def top_k(logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The top-k view of teacher logits (N, V) at ``temperature`` (what the cache stores)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, logp.shape[-1])
    values, index = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, index, float("-inf"))  # the tail in log space: no underflow to a zero mass
    return TopK(values, index, torch.logsumexp(rest, dim=-1))


def coarse_logprobs(top: TopK, logq: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the k tokens plus "any other token": (N, k+1) each
    ((N, k) when k = V: there is no other token, and a logsumexp over nothing has no gradient)."""
    logq_k = logq.gather(-1, top.index)
    if top.index.shape[-1] == logq.shape[-1]:
        return top.logp, logq_k
    tail_q = torch.logsumexp(logq.scatter(-1, top.index, float("-inf")), dim=-1)
    return torch.cat([top.logp, top.tail[:, None]], -1), torch.cat([logq_k, tail_q[:, None]], -1)


Teacher = Union[Tensor, TopK]  # full logits (N, V), or a top-k view already at the loss temperature


def token_losses(student_logits: Tensor, teacher: Teacher, targets: Tensor, kind: Divergence = "forward_kl",
                 beta: float = 0.5, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-row (divergence at temperature T, cross-entropy at T = 1), both (N,) float32.

    student_logits (N, V); teacher: logits (N, V) or a TopK made at ``temperature``; targets (N,)
    the next tokens (the CE's; every row counts here, the caller picks the rows)."""
    z = student_logits.float()
    logq = F.log_softmax(z / temperature, dim=-1)
    if isinstance(teacher, TopK):
        logp, logq_d = coarse_logprobs(teacher, logq)
    else:
        logp, logq_d = F.log_softmax(teacher.float() / temperature, dim=-1), logq
    kd = divergence(kind, logp, logq_d, beta)
    logq1 = logq if temperature == 1.0 else F.log_softmax(z, dim=-1)
    ce = -logq1.gather(-1, targets[:, None]).squeeze(-1)
    return kd, ce


# ----------------------------------------------------------------------------- the chunked loss


def distill_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor,
                 teacher: Callable[[Tensor], Teacher], *, kind: Divergence = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, kd_weight: float = 1.0, chunk_size: int = 0,
                 vocab_size: int = 32768) -> tuple[Tensor, dict]:
    """Mean distillation loss over the counted rows, and its parts (detached means ``kd``, ``ce``).

    hidden (N, d) the student's final hidden states; ``head`` maps (C, d) -> (C, V) logits;
    targets (N,) next tokens, -100 where a row does not count; ``teacher(rows)`` gives the
    teacher for those row indices (logits (C, V) or a TopK). ``chunk_size`` rows at a time
    (0: about 8 chunks of at most ~1 GiB of fp32 logits at ``vocab_size``); chunked and
    unchunked give the same loss and gradients.
    """
    from model.kernels.chunked_ce import default_chunk_size

    rows = (targets != -100).nonzero().squeeze(1)  # (N_c,)
    n = rows.numel()
    if n == 0:  # nothing counts: a zero that still reaches the graph, like the chunked CE
        zero = hidden.sum() * 0.0
        return zero, {"kd": zero.detach(), "ce": zero.detach()}
    h, tgt = hidden[rows], targets[rows]
    t2 = temperature * temperature

    def chunk(h_c: Tensor, rows_c: Tensor, tgt_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = head(h_c)  # (C, V): the only student logits alive, recomputed in backward
        if kd_weight == 0.0:  # plain next-token loss: the teacher is not asked
            ce = F.cross_entropy(z.float(), tgt_c, reduction="none")
            return ce.sum(), torch.zeros((), device=z.device), ce.detach().sum()
        kd, ce = token_losses(z, teacher(rows_c), tgt_c, kind, beta, temperature)
        loss = kd_weight * t2 * kd + (1.0 - kd_weight) * ce
        return loss.sum(), kd.detach().sum(), ce.detach().sum()

    size = chunk_size or default_chunk_size(n, vocab_size)
    total = kd_sum = ce_sum = 0.0
    for s in range(0, n, size):
        args = (h[s:s + size], rows[s:s + size], tgt[s:s + size])
        loss_c, kd_c, ce_c = checkpoint(chunk, *args, use_reentrant=False) if h.requires_grad else chunk(*args)
        total, kd_sum, ce_sum = total + loss_c, kd_sum + kd_c, ce_sum + ce_c
    return total / n, {"kd": kd_sum / n, "ce": ce_sum / n}
