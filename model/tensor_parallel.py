"""Tensor parallelism (Megatron-LM style) of the one Transformer, on torch's DTensor engine.

    apply_tensor_parallel(model, mesh["tp"])    # in place; call before FSDP2 shards the dp dimension

Each block's matmuls are split over the ``tp`` ranks so that one all-reduce joins them per sublayer:

    attention   q/k/v (or MLA's q_b/kv_b) column-parallel: each rank holds n_heads/tp heads
                (and n_kv_heads/tp KV heads) and attends over them alone; o_proj row-parallel,
                its partial sums all-reduced
    MLP         gate/up column-parallel, down row-parallel (the shared experts of an MoE layer too)
    embedding   vocab-parallel: each rank holds vocab/tp rows, the lookups all-reduced
    lm_head     column-parallel over the vocabulary, the logits gathered (Replicate), so every
                loss reads whole logits: the documented alternative to a vocab-parallel loss,
                which costs a (B, T, V) gather instead of a fused parallel cross-entropy

Everything else (norms, MLA's low-rank down-projections, the MoE router and routed experts,
learned positions) stays whole on every rank and computes the same values there: the routed
experts are replicated, not expert-parallel (see docs/ARCHITECTURE.md, "Parallelism").
``torch.distributed.tensor.parallel.parallelize_module`` does the sharding and the collectives.
"""
from __future__ import annotations

import torch.nn as nn

from utils.errors import UserError

COLUMN = ("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """UserError naming what does not divide (or is not built) for ``tp`` ranks."""
    cfg = model.cfg
    problems = []
    heads = [("n_heads", cfg.n_heads)] + ([("n_kv_heads", cfg.n_kv_heads)] if cfg.attention != "mla" else [])
    for name, n in heads + [("vocab_size", cfg.vocab_size)]:
        if n % tp:
            problems.append(f"model.{name}={n} is not a multiple of tp={tp}")
    if cfg.ffn != "moe" or cfg.moe["first_k_dense"] > 0:
        if cfg.d_ff % tp:
            problems.append(f"model.d_ff={cfg.d_ff} is not a multiple of tp={tp}")
    if cfg.ffn == "moe" and cfg.moe["n_shared_experts"] and (cfg.moe["moe_d_ff"] * cfg.moe["n_shared_experts"]) % tp:
        problems.append(f"the shared experts' width {cfg.moe['moe_d_ff'] * cfg.moe['n_shared_experts']} is not a "
                        f"multiple of tp={tp}")
    if cfg.qk_norm and cfg.qk_norm_scope == "all":
        problems.append("qk_norm_scope='all' (OLMo-2) normalises q and k over every head, which tp splits")
    if cfg.attention == "linear":
        problems.append("linear attention is not built for tensor parallelism")
    if any(type(m).__name__ in ("LoRALinear", "LoRAExperts", "Linear4bit", "NF4Experts") for m in model.modules()):
        problems.append("LoRA / QLoRA layers are not built for tensor parallelism (full fine-tuning is)")
    if problems:
        raise UserError(f"train.parallel.tp={tp} does not fit this model: {'; '.join(problems)}. "
                        "Choose a tp that divides them, or tp: 1 (FSDP2/DDP only).")


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard ``model`` (a Transformer, weights already loaded) over the 1-D ``tp_mesh`` in place."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    check_tensor_parallel(model, tp)
    rank = tp_mesh.get_local_rank()
    for block in model.layers:
        plan = {}
        for name, module in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf in COLUMN:
                plan[name] = ColwiseParallel()
            elif isinstance(module, nn.Linear) and leaf in ROW:
                plan[name] = RowwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        attn = block.attn
        attn.n_heads //= tp  # each rank runs its own slice of the heads
        if hasattr(attn, "n_kv_heads"):
            attn.n_kv_heads //= tp
        alibi = getattr(attn, "alibi", None)
        if alibi is not None:  # the slopes of this rank's heads
            attn.alibi = alibi.chunk(tp)[rank].clone()
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),  # vocab rows split
        "lm_head": ColwiseParallel(output_layouts=Replicate()),  # vocab columns split, logits gathered
    })
    if model.cfg.tie_embeddings:  # both are (vocab, d) split by vocab rows: one tensor again
        model.lm_head.weight = model.embed.weight
