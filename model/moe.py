"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

    y = sum_{s} Shared_s(x) + sum_{i in TopK(x)} g_i(x) * Expert_i(x)

(Qwen2-MoE gates the shared part per token: sigmoid(w . x) * sum_s Shared_s(x).)

Routing (DeepSeek-V2/V3):
  scores s = softmax(W_r x) or sigmoid(W_r x)           (float32, per token)
  selection uses s + b, b a per-expert bias that is NOT trained by gradients
  (auxiliary-loss-free balancing), optionally restricted to the ``topk_group`` best groups
  of experts ("node-limited" routing); the gate g_i uses the unbiased s_i of the chosen
  experts, renormalised to sum 1 if ``norm_topk_prob``, times ``routed_scaling_factor``.

Balancing, DeepSeek-V3 style:
  * training forwards count tokens per expert; after each optimizer step the trainer calls
    ``update_moe_biases(model)`` (or ``layer.update_bias()``), which moves every bias by
    b_i += rate * sign(mean_load - load_i) using the load counted since the last update
    (summed over ranks when torch.distributed is initialised, so every rank agrees).
    Counting in forward and updating once per step keeps gradient accumulation and
    activation recomputation from double-counting.
  * optional sequence-wise aux loss alpha * sum_i f_i P_i, stored as ``layer.aux_loss``
    after each training forward; ``moe_aux_loss(model)`` sums it over layers.

Dispatch sorts the (token, expert) assignments by expert so each expert runs one matmul on
a contiguous block of its tokens (a loop over experts, never over tokens). The routed experts
can be stored in NF4 (model/quant.py) and carry LoRA adapters (model/lora_experts.py), both
inside the same dispatch.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.ffn import GatedMLP, activation


def route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    scoring: str,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick k experts per token.

    logits (N, E) float32, bias (E,) -> (weights (N, k) float32, experts (N, k) long,
    scores (N, E) float32, the unbiased affinities).
    """
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores + bias  # the bias steers selection only; gates use the raw scores
    if n_group > 1:
        N, E = choice.shape
        grouped = choice.view(N, n_group, E // n_group)
        if scoring == "sigmoid":  # DeepSeek-V3: a group is rated by the sum of its top-2 experts
            group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        else:  # DeepSeek-V2: by its best expert
            group_score = grouped.amax(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    experts = choice.topk(k, dim=-1).indices  # (N, k)
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, experts, scores


def sequence_aux_loss(scores: torch.Tensor, experts: torch.Tensor, B: int, coef: float) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the B sequences.

    scores (B*T, E) raw affinities, experts (B*T, k) chosen indices.
    f_i = E / (k T) * #{t : i chosen at t}   P_i = mean_t s'_{i,t},  s' = s / sum_j s_j
    L = coef * sum_i f_i P_i  (equals coef when routing is perfectly uniform).
    """
    N, E = scores.shape
    k = experts.shape[1]
    T = N // B
    chosen = torch.zeros(B, T, E, device=scores.device).scatter_(2, experts.view(B, T, k), 1.0)
    f = chosen.sum(1) * E / (k * T)  # (B, E), no gradient (selection is discrete)
    p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # (B, E)
    return coef * (f * p).sum(-1).mean()


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the stacked weights of every expert


def dispatch(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, n_experts: int,
             expert_ffn: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted dispatch: x (N, d), experts/weights (N, k) -> (y (N, d), tokens per expert (E,)).

    The (token, expert) assignments are sorted by expert, so ``expert_ffn(e, h)`` runs once per
    expert on the contiguous block h (n_e, d) of its tokens; outputs are weighted by the gates and
    summed back per token. One loop over experts, never over tokens: on CPU at DeepSeek-V3 nano's
    sizes this is faster than padding the groups into one batched matmul and on a par with torch's
    private grouped GEMM (``torch._grouped_mm``; bench/bench_moe.py, docs/BENCHMARKS.md)."""
    N, k = experts.shape
    flat = experts.reshape(-1)  # (N*k,) assignment a -> expert flat[a], token a // k
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    token = order // k
    xs = x[token]  # (N*k, d) grouped by expert
    outs = [expert_ffn(e, chunk) for e, (chunk, n) in enumerate(zip(xs.split(counts.tolist()), counts.tolist())) if n]
    if not outs:  # no tokens at all
        return torch.zeros_like(x), counts
    ys = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
    y = torch.zeros_like(x).index_add_(0, token, ys)
    return y, counts


class Experts(nn.Module):
    """E gated MLPs stored as stacked weights: gate/up (E, d_ff, d), down (E, d, d_ff).

    ``stacked(name)`` is the weight a forward computes with; the NF4 copy (model/quant.py) and the
    LoRA wrapper (model/lora_experts.py) answer it too and share ``dispatch``."""

    def __init__(self, n: int, d_model: int, d_ff: int, act: str):
        super().__init__()
        self.n_experts, self.act_name = n, act
        self.gate_proj = nn.Parameter(torch.empty(n, d_ff, d_model))
        self.up_proj = nn.Parameter(torch.empty(n, d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(n, d_model, d_ff))
        self.act = activation(act)

    def stacked(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def stacked_shape(self, name: str) -> torch.Size:
        return getattr(self, name).shape

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d), experts/weights (N, k) -> (y (N, d), tokens per expert (E,))."""
        return run_experts(self, x, experts, weights)


def run_experts(module: nn.Module, x: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated MLP of each expert over its tokens, for any module with ``stacked``, ``act`` and
    ``n_experts`` (full-precision ``Experts``, NF4 ``model.quant.NF4Experts``)."""
    # unbind, not [e]: indexing a stacked parameter E times would make backward write E
    # full-size zero gradients (measured 40% of the layer's time); unbind's backward is one stack.
    gates, ups, downs = (module.stacked(n).unbind(0) for n in PROJECTIONS)

    def expert_ffn(e: int, h: torch.Tensor) -> torch.Tensor:
        return (module.act(h @ gates[e].t()) * (h @ ups[e].t())) @ downs[e].t()

    return dispatch(x, experts, weights, module.n_experts, expert_ffn)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.cfg = cfg
        self.n_experts, self.k = m["n_routed_experts"], m["n_experts_per_tok"]
        self.scoring, self.norm_topk_prob = m["scoring"], m["norm_topk_prob"]
        self.scaling = m["routed_scaling_factor"]
        self.n_group, self.topk_group = m["n_group"], m["topk_group"]
        self.bias_rate, self.aux_coef = m["aux_free_bias_update_rate"], m["seq_aux_loss_coef"]
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, cfg.d_model, m["moe_d_ff"], cfg.activation)
        n_shared = m["n_shared_experts"]
        # n shared experts of width moe_d_ff are one gated MLP of width n * moe_d_ff.
        self.shared_experts = GatedMLP(cfg, d_ff=m["moe_d_ff"] * n_shared) if n_shared else None
        # Qwen2-MoE scales the shared experts per token by sigmoid(w . x).
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if m["shared_expert_gate"] else None
        # Persistent: a resumed or exported model keeps its balance (HF: e_score_correction_bias).
        self.register_buffer("expert_bias", torch.zeros(self.n_experts))
        self.register_buffer("load_since_update", torch.zeros(self.n_experts), persistent=False)
        self.last_load: Optional[torch.Tensor] = None  # (E,) tokens per expert, last forward
        self.aux_loss: Optional[torch.Tensor] = None

    def reset_extra_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.experts.gate_proj, std=std)
        nn.init.normal_(self.experts.up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=std / math.sqrt(2 * self.cfg.n_layers))
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits = F.linear(flat.float(), self.router.weight.float())  # routing in fp32
        weights, experts, scores = route(
            logits, self.expert_bias, self.k, self.scoring, self.n_group, self.topk_group, self.norm_topk_prob, self.scaling
        )
        y, counts = self.experts(flat, experts, weights)
        self.last_load = counts.detach()
        if self.training:
            self.load_since_update += counts.to(self.load_since_update.dtype)
            self.aux_loss = sequence_aux_loss(scores, experts, B, self.aux_coef) if self.aux_coef > 0 else None
        y = y.view(B, T, d)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += rate * sign(mean_load - load_i) over the load counted since the last call."""
        load = self.load_since_update
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if self.bias_rate > 0 and load.sum() > 0:
            self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
        load.zero_()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_moe_biases(model: nn.Module) -> None:
    """Call after each optimizer step: aux-loss-free bias update of every MoE layer."""
    for m in moe_layers(model):
        m.update_bias()


def moe_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the sequence-wise balance losses of the last training forward (None if disabled)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_load_stats(model: nn.Module) -> dict[str, float]:
    """For logging: per layer, max/mean tokens per expert of the last forward (1.0 = balanced)."""
    stats = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE) and m.last_load is not None and m.last_load.sum() > 0:
            load = m.last_load.float()
            stats[f"moe/{name}/max_over_mean_load"] = (load.max() / load.mean()).item()
    return stats
