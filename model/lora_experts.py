"""LoRA on the routed experts of an MoE layer: one low-rank update per expert and projection.

    W_e' = W_e + s B_e A_e,    A (E, r, in), B (E, out, r), s = alpha / r (rsLoRA: alpha / sqrt(r))

for each of the stacked projections gate_proj, up_proj, down_proj (model/moe.py ``Experts``).
The wrapper holds the frozen stacked experts as ``base`` (plain, or NF4 from model/quant.py) and
runs the same sorted dispatch: expert e's block of tokens h gets h W_e^T + s (h A_e^T) B_e^T, so
the adapters add matmuls inside the dispatch's one loop over experts and no loop of their own.
A starts kaiming-uniform per expert and B at zero, as model/lora.py's LoRALinear does, so the
wrapped layer computes exactly what the base did until training moves B.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from model.moe import PROJECTIONS, Experts, dispatch
from utils.errors import UserError


class LoRAExperts(nn.Module):
    """Frozen stacked experts (``base``) plus per-expert adapters ``lora_A[proj]``, ``lora_B[proj]``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 name: str = "experts"):
        super().__init__()
        shapes = {p: tuple(base.stacked_shape(p)) for p in PROJECTIONS}  # (E, out, in)
        smallest = min(min(s[1], s[2]) for s in shapes.values())
        if r <= 0 or r > smallest:
            raise UserError(f"LoRA rank r={r} does not fit the experts of {name} (their smallest side is {smallest}); "
                            f"choose 1 <= r <= {smallest}.")
        self.base = base
        self.n_experts = base.n_experts
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = next(base.parameters()).device
        # Adapters stay in full precision over an NF4 base (QLoRA); else they follow the base dtype.
        dtype = base.gate_proj.dtype if isinstance(base, Experts) else torch.float32
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p, (E, out_f, in_f) in shapes.items():
            A = torch.empty(E, r, in_f, device=device, dtype=dtype)
            for e in range(E):  # as nn.Linear (and PEFT) initialise each A
                nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
            self.lora_A[p] = nn.Parameter(A)
            self.lora_B[p] = nn.Parameter(torch.zeros(E, out_f, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self, proj: str) -> torch.Tensor:
        """What the adapters add to the stacked weight ``proj``: s B_e A_e for every e, (E, out, in)."""
        return torch.bmm(self.lora_B[proj], self.lora_A[proj]) * self.scaling

    def stacked(self, proj: str) -> torch.Tensor:
        """The effective stacked weight W + s B A (E, out, in), the NF4 base dequantized."""
        w = self.base.stacked(proj)
        return w if self.merged else w + self.delta_weight(proj).to(w.dtype)

    def stacked_shape(self, proj: str) -> torch.Size:
        return self.base.stacked_shape(proj)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d), experts/weights (N, k) -> (y (N, d), tokens per expert (E,)), as ``Experts``."""
        W = {p: self.base.stacked(p).unbind(0) for p in PROJECTIONS}
        A = {p: self.lora_A[p].unbind(0) for p in PROJECTIONS}
        B = {p: self.lora_B[p].unbind(0) for p in PROJECTIONS}

        def project(p: str, e: int, h: torch.Tensor) -> torch.Tensor:
            y = h @ W[p][e].t()  # (n_e, out)
            if self.merged:
                return y
            a = self.dropout(h).to(A[p][e].dtype)
            return y + ((a @ A[p][e].t()) @ B[p][e].t() * self.scaling).to(y.dtype)

        def expert_ffn(e: int, h: torch.Tensor) -> torch.Tensor:
            return project("down_proj", e, self.base.act(project("gate_proj", e, h)) * project("up_proj", e, h))

        return dispatch(x, experts, weights, self.n_experts, expert_ffn)

    def merge(self) -> None:
        """W += s B A in place (a plain base only: an NF4 base would be re-quantized)."""
        if not isinstance(self.base, Experts):
            raise UserError("these experts have a 4-bit base; merging in place would re-quantize it. "
                            "Use merge_and_unload(model), which dequantizes the base first.")
        if not self.merged:
            with torch.no_grad():
                for p in PROJECTIONS:
                    getattr(self.base, p).add_(self.delta_weight(p).to(getattr(self.base, p).dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                for p in PROJECTIONS:
                    getattr(self.base, p).sub_(self.delta_weight(p).to(getattr(self.base, p).dtype))
            self.merged = False

    def unload(self, dtype: Optional[torch.dtype] = None) -> Experts:
        """Plain ``Experts`` holding W + s B A (an NF4 base dequantized first)."""
        E, out_f, in_f = self.stacked_shape("gate_proj")
        with torch.no_grad():
            weights = {p: self.stacked(p).detach() for p in PROJECTIONS}
        out_dtype = dtype or next(iter(weights.values())).dtype
        plain = Experts(E, in_f, out_f, self.base.act_name).to(device=weights["gate_proj"].device, dtype=out_dtype)
        with torch.no_grad():
            for p, w in weights.items():
                getattr(plain, p).copy_(w)
        return plain

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
