"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

    y = W x + b + s * B A dropout(x),    A (r, in), B (out, r), s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts kaiming-uniform and B at zero (PEFT's defaults), so the wrapped model computes
exactly what the base did until training moves B. The wrapper holds the base layer as
``base`` (an ``nn.Linear`` or a bitsandbytes ``Linear4bit`` for QLoRA); the adapter is the
two matrices ``lora_A`` and ``lora_B``. The stacked routed experts of an MoE layer get one
adapter per expert and projection (model/lora_experts.py ``LoRAExperts``); every function
here handles both kinds.

    names = apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)   # or "all-linear"
    ...train...
    save_adapter("runs/x/adapter", model, LoRAConfig(...))           # adapters only, small
    load_lora(fresh_model, "runs/x/adapter")                          # checks the base matches
    merge_and_unload(model); export_hf(model, "hf_out")               # plain weights, HF layout
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from model.linear_layers import Targets, is_4bit, is_expert_stack, is_quantized, match_linears, set_module
from model.lora_experts import LoRAExperts
from utils.errors import UserError

@dataclass
class LoRAConfig:
    """What an adapter is: rank, scale, dropout and which linear layers it wraps."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r
    targets: Targets = "all-linear"  # name patterns (fnmatch, e.g. "q_proj", "layers.*.ffn.*") or "all-linear"
    # Modules trained in full beside the adapters and saved with them (PEFT's modules_to_save), e.g.
    # [embed, lm_head] when the base never saw the chat tokens: frozen untrained rows cannot learn them.
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise UserError(f"lora.r must be a positive rank, got {self.r}; typical values are 4 to 64.")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.targets, list) and not self.targets:
            raise UserError("lora.targets is an empty list; name patterns such as [q_proj, v_proj] or use 'all-linear'.")


class LoRALinear(nn.Module):
    """A frozen ``base`` linear layer plus ``scaling * B @ A`` (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, name: str = "layer"):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        if r <= 0 or r > min(in_f, out_f):
            raise UserError(
                f"LoRA rank r={r} does not fit {name} ({in_f} -> {out_f}); "
                f"choose 1 <= r <= {min(in_f, out_f)} (a rank above min(in, out) adds nothing but parameters)."
            )
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = base.weight
        # Adapters stay in full precision even over a 4-bit base (QLoRA); else follow the base dtype.
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to W: scaling * B @ A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (out, in), W + s B A (W dequantized for a 4-bit base), for code that
        reads ``.weight`` instead of calling the layer (MLA's absorbed decode path)."""
        from model.quant import dequantized_weight

        w = dequantized_weight(self.base) if is_4bit(self.base) else self.base.weight
        return w if self.merged else w + self.delta_weight().to(w.dtype)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + ((h @ self.lora_A.t()) @ self.lora_B.t() * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


Adapted = Union[LoRALinear, LoRAExperts]


def lora_layers(model: nn.Module) -> dict[str, Adapted]:
    """Every adapted module by name: LoRALinear layers and LoRAExperts (routed experts)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def adapter_tensors(layer: Adapted) -> dict[str, nn.Parameter]:
    """The adapter's trainable tensors by their name under the layer: ``lora_A``, ``lora_B``
    (LoRALinear) or ``lora_A.gate_proj`` ... ``lora_B.down_proj`` (LoRAExperts)."""
    return {n: p for n, p in layer.named_parameters() if n.startswith("lora_")}


def apply_lora(
    model: nn.Module, targets: Targets = "all-linear", r: int = 8, alpha: float = 16.0,
    dropout: float = 0.0, rslora: bool = False, modules_to_save: Sequence[str] = (),
) -> list[str]:
    """Wrap the selected linear layers in LoRALinear and freeze everything but the adapters
    (and the parameters of ``modules_to_save``, which train in full).

    Returns the wrapped module names. Call it after the base weights are loaded (and after
    ``model.quant.quantize_model`` for QLoRA).
    """
    if r <= 0:
        raise UserError(f"LoRA rank r must be positive, got {r}.")
    if lora_layers(model):
        raise UserError("this model already has LoRA adapters; merge_and_unload it or start from the base model.")
    names = match_linears(model, targets)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False) and "lm_head" in names:
        raise UserError("lm_head shares its weight with the embedding (tie_embeddings); leave it out of lora.targets.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        layer = model.get_submodule(name)
        kind = LoRAExperts if is_expert_stack(layer) else LoRALinear
        wrapper = kind(layer, r, alpha, dropout, rslora, name=name)
        set_module(model, name, wrapper.train(model.training))  # a new module would start in train mode
    for p in saved_parameters(model, modules_to_save).values():
        p.requires_grad_(True)
    return names


def saved_parameters(model: nn.Module, modules_to_save: Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters of the fully trained modules, by state-dict name, each tensor once (tied
    embedding and head are one tensor). Patterns match module names as in ``match_linears``."""
    wrapped = set(lora_layers(model))
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for pattern in modules_to_save:
        hits = [n for n, _ in model.named_modules() if n and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern))]
        if not hits:
            raise UserError(f"lora.modules_to_save pattern {pattern!r} matches no module of this model (e.g. embed, lm_head, norm).")
        for name in hits:
            if any(name == w or name.startswith(w + ".") or w.startswith(name + ".") for w in wrapped):
                raise UserError(f"{name} is both a LoRA target and in lora.modules_to_save; a layer is either adapted or trained in full.")
            if any(is_quantized(m) for m in model.get_submodule(name).modules()):
                raise UserError(f"{name} is stored in 4 bits (QLoRA) and cannot be trained in full; leave it out of qlora.targets.")
            for p_name, p in model.get_submodule(name).named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out[f"{name}.{p_name}"] = p
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- merge / unmerge


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place (W += s B A); reversible by unmerge_lora."""
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoRAExperts):
            layer.merge()
            continue
        if layer.merged:
            continue
        if is_4bit(layer.base):
            raise UserError(
                f"{name} has a 4-bit base; merging in place would re-quantize it. "
                "Use merge_and_unload(model), which dequantizes the base first."
            )
        with torch.no_grad():
            layer.base.weight += layer.delta_weight().to(layer.base.weight.dtype)
        layer.merged = True


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (W -= s B A), restoring the base weights up to float rounding."""
    for layer in lora_layers(model).values():
        if isinstance(layer, LoRAExperts):
            layer.unmerge()
        elif layer.merged:
            with torch.no_grad():
                layer.base.weight -= layer.delta_weight().to(layer.base.weight.dtype)
            layer.merged = False


def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace each LoRALinear by a plain nn.Linear holding W + s B A (LoRAExperts by plain
    stacked experts); returns the model.

    A 4-bit base is dequantized first. The result has the base model's parameter names,
    so ``model.hf_interop.export_hf`` and ``utils.checkpoint.save_checkpoint`` write it as is.
    """
    from model.quant import dequantized_weight

    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoRAExperts):
            set_module(model, name, layer.unload(dtype))
            continue
        base = layer.base
        w = dequantized_weight(base) if is_4bit(base) else base.weight.detach()
        if not layer.merged or is_4bit(base):
            w = w + layer.delta_weight().detach().to(w.dtype)
        out_dtype = dtype or (w.dtype if not is_4bit(base) else layer.lora_A.dtype)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=w.device, dtype=out_dtype)
        with torch.no_grad():
            plain.weight.copy_(w)
            if base.bias is not None:
                plain.bias.copy_(base.bias.detach())
        set_module(model, name, plain)
    return model


# ----------------------------------------------------------------------------- saving / loading


def lora_state_dict(model: nn.Module, modules_to_save: Sequence[str] = (), live: bool = False) -> dict[str, torch.Tensor]:
    """Adapter tensors: ``{name}.lora_A`` (r, in), ``{name}.lora_B`` (out, r) (routed experts:
    ``{name}.lora_A.gate_proj`` (E, r, in), ... ``{name}.lora_B.down_proj`` (E, out, r)), plus the
    fully trained modules' parameters. ``live=True`` returns the parameters themselves (the training
    loop saves them and copies resumed values back into them); else detached CPU copies."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state.update({f"{name}.{k}": v for k, v in adapter_tensors(layer).items()})
    state.update(saved_parameters(model, modules_to_save))
    return state if live else {k: v.detach().cpu().contiguous() for k, v in state.items()}


def live_adapter_weights(modules_to_save: Sequence[str] = ()) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """The training loop's ``weights_fn`` for a LoRA run: the live adapter tensors (and fully
    trained modules) of the (possibly DDP-wrapped) model, so checkpoints hold only those."""
    from utils.distributed import unwrap

    def weights(model: nn.Module) -> dict[str, torch.Tensor]:
        return lora_state_dict(unwrap(model), modules_to_save, live=True)

    return weights


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base model's parameter names and logical shapes.

    Adapters, the LoRA wrapper's ``.base`` level and 4-bit packing are looked through, so a
    plain, a LoRA-wrapped and a quantized copy of one architecture share a fingerprint.
    """
    wrapped = set(lora_layers(model))
    shapes = []
    for mod_name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAExperts)):
            continue  # its base layer is visited as a child
        owner = mod_name[: -len(".base")] if mod_name.endswith(".base") and mod_name[: -len(".base")] in wrapped else mod_name
        for p_name, p in m.named_parameters(recurse=False):
            if is_4bit(m) and p_name == "weight":
                shape = [m.out_features, m.in_features]
            elif is_expert_stack(m):
                shape = list(m.stacked_shape(p_name))  # NF4 experts: the logical (E, out, in)
            else:
                shape = list(p.shape)
            shapes.append((f"{owner}.{p_name}" if owner else p_name, shape))
    return hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()[:16]


def adapter_meta(model: nn.Module, lora_cfg: LoRAConfig, **extra) -> dict:
    """The meta.json of an adapter checkpoint: kind, LoRA settings, wrapped layers, base fingerprint."""
    return {
        "kind": "adapter",
        "lora": asdict(lora_cfg),
        "lora_layers": sorted(lora_layers(model)),
        "base_fingerprint": base_fingerprint(model),
        **extra,
    }


def save_adapter(path: str | os.PathLike, model: nn.Module, lora_cfg: LoRAConfig, **meta) -> Path:
    """Write the adapters alone (a small checkpoint dir whose meta.json says kind=adapter), atomically."""
    from utils.checkpoint import save_checkpoint

    weights = lora_state_dict(model, lora_cfg.modules_to_save)
    return save_checkpoint(path, model, weights=weights, meta=adapter_meta(model, lora_cfg, **meta))


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    from utils.checkpoint import read_meta

    meta = read_meta(path)
    if meta.get("kind") != "adapter" or "lora" not in meta:
        raise UserError(f"{path} is not a LoRA adapter checkpoint (its meta.json has no kind=adapter and lora settings).")
    return LoRAConfig(**meta["lora"])


def load_lora(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Wrap ``model`` as the adapter at ``path`` says and load its A/B weights.

    ``model`` is the base (plain or quantized). The adapter's stored base ModelConfig and
    shape fingerprint must match, otherwise UserError: an adapter only means something on
    the base it was trained on.
    """
    from utils.checkpoint import load_weights, read_config_dict, read_meta

    lora_cfg = read_adapter_config(path)
    meta = read_meta(path)
    base_cfg = read_config_dict(path)
    own_cfg = getattr(model, "cfg", None)
    diff = [] if own_cfg is None else [
        k for k, v in base_cfg.items() if own_cfg.to_dict().get(k) != v and k != "extra"  # extra: free-form notes
    ]
    if diff:
        raise UserError(
            f"adapter {path} was trained on a different base model (config differs in {diff[:6]}); "
            "load the base checkpoint it was made for (see its model_config.json)."
        )
    if not lora_layers(model):
        apply_lora(model, meta["lora_layers"], lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.rslora, lora_cfg.modules_to_save)
    if base_fingerprint(model) != meta.get("base_fingerprint"):
        raise UserError(f"adapter {path} was trained on a base with different weight shapes; load the base it was made for.")
    state = load_weights(path)
    targets = lora_state_dict(model, lora_cfg.modules_to_save, live=True)
    if set(state) != set(targets):
        raise UserError(f"adapter {path} holds {len(state)} tensors but this model's adapters need {len(targets)}; the adapter does not fit.")
    with torch.no_grad():
        for key, dst in targets.items():
            if dst.shape != state[key].shape:
                raise UserError(f"adapter {path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(dst.shape)}.")
            dst.copy_(state[key])
    return sorted(lora_layers(model))
