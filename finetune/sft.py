"""Supervised finetuning shared by the three entry scripts (full, LoRA, QLoRA).

    base checkpoint --(long-context ModelConfig)--> Transformer --(NF4 base?)--(LoRA?)--> train(...)

The loss is cross-entropy on assistant tokens only (``loss_mask`` from the SFT loader);
the one training loop (``utils.train_loop.train``) does the rest: accumulation, logging,
checkpoints, resume, DDP. LoRA/QLoRA runs save adapters only; full SFT saves the model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from finetune.recipe import SFTRecipe
from model.config import ModelConfig
from model.load import load_model, read_config
from model.lora import adapter_meta, apply_lora, live_adapter_weights
from utils.errors import UserError


# ----------------------------------------------------------------------------- model


def long_context_config(base: ModelConfig, seq_len: int, max_seq_len: Optional[int] = None,
                        rope_scaling: Optional[dict] = None) -> ModelConfig:
    """The base's ModelConfig, extended for a longer SFT context when the recipe asks
    (``ModelConfig.with_context``), and checked against the recipe's train.seq_len."""
    cfg = base.with_context(max_seq_len, rope_scaling)
    if seq_len > cfg.max_seq_len:
        raise UserError(
            f"train.seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}; for long-context SFT set "
            f"max_seq_len: {seq_len} and rope_scaling (e.g. {{type: yarn, factor: {max(2, -(-seq_len // base.max_seq_len))}}}) "
            "in the recipe, or lower train.seq_len."
        )
    return cfg


def build_sft_model(recipe: SFTRecipe, device: torch.device) -> tuple[nn.Module, dict]:
    """Base model, long-context config, NF4 base (QLoRA) and adapters (LoRA) as the recipe says.

    Returns (model, info) where info holds the wrapped layer names, trainable count and the
    base's training FLOPs per token (measured before quantization packs the weights).
    """
    from utils.flops import flops_per_token

    base_cfg = read_config(recipe.model.init_from)
    cfg = long_context_config(base_cfg, recipe.train.seq_len, recipe.model.max_seq_len, recipe.model.rope_scaling)
    model = load_model(recipe.model.init_from, config=cfg, device=device, train=True, expect="lm")
    info: dict[str, Any] = {"flops_per_token": flops_per_token(model, recipe.train.seq_len), "mode": recipe.mode}
    if recipe.qlora is not None:
        from model.quant import base_bytes_per_param, quantize_for_qlora

        info["quantized"] = quantize_for_qlora(model, recipe.qlora)
        info["base_bytes_per_param"] = base_bytes_per_param(model)
    if recipe.lora is not None:
        lc = recipe.lora
        torch.manual_seed(recipe.train.seed)  # adapter init (kaiming A) is part of the run: same seed, same A
        info["lora_layers"] = apply_lora(model, lc.targets, lc.r, lc.alpha, lc.dropout, lc.rslora, lc.modules_to_save)
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total"] = sum(p.numel() for p in model.parameters())
    return model, info


# ----------------------------------------------------------------------------- loss


def sft_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over assistant tokens of one micro-batch.

    batch: (x, y, loss_mask[, positions]) with x, y (B, T) token ids (y = x shifted by one)
    and loss_mask (B, T), 1 where y is an assistant token. Padding and prompt tokens do not
    count. ``positions`` (B, T), restarting at 0 at each packed example, turn on document
    masking: each example attends only to itself, as if it were alone in the row.
    ``loss_weight`` (the count of assistant tokens) makes the loop average over tokens across
    micro-batches, not over micro-batches.
    """
    from model.attention import document_ids
    from model.loss import lm_loss

    if isinstance(batch, dict):
        x, y, mask, positions = batch["x"], batch["y"], batch["loss_mask"], batch.get("positions")
    else:
        x, y, mask = batch[:3]
        positions = batch[3] if len(batch) > 3 else None
    mask = mask.bool()
    documents = document_ids(positions) if positions is not None else None
    loss = lm_loss(model, x, y.masked_fill(~mask, -100), positions, documents)  # prompts and padding do not count
    n_target = int(mask.sum())  # a micro-batch without assistant tokens has loss 0 and weight 0
    return loss, {"loss_weight": float(n_target), "n_tokens": x.numel(), "target_frac": n_target / mask.numel()}


# ----------------------------------------------------------------------------- data


def make_loader(recipe: SFTRecipe, split: str, seed: int, rank: int = 0, world_size: int = 1, vocab_size: Optional[int] = None):
    """The SFT bins as (x, y, loss_mask[, positions]) batches, checked against the tokenizer and the
    model's vocabulary.

    Packed rows with ``data.document_mask`` (the default) carry per-example positions, which
    ``sft_loss`` turns into a block-diagonal causal mask: an example sees neither the examples
    packed before it nor those after, and its positions start at 0, so its logits are those it
    would have alone. Without it, packed examples attend to earlier ones in the row (as HF
    packing without varlen attention does); either way only assistant tokens carry loss.
    """
    from data_pipeline.loader import SFTLoader
    from data_pipeline.tokenizer.tokenizer import file_hash

    t = recipe.train
    loader = SFTLoader(recipe.data.bin_dir, split, t.seq_len, t.batch_size, seed, rank, world_size,
                       pack=recipe.data.pack, expect_tokenizer_hash=file_hash(tokenizer_path(recipe)),
                       drop_long=recipe.data.long_examples == "drop",
                       return_position_ids=recipe.data.pack and recipe.data.document_mask)
    vocab = loader.meta.get("vocab_size")
    if vocab_size is not None and isinstance(vocab, int) and vocab > vocab_size:
        raise UserError(f"{recipe.data.bin_dir} holds token ids up to {vocab - 1} but the base model's vocab_size is "
                        f"{vocab_size}; the bins were made with another tokenizer than the base was pretrained with.")
    return loader


def prepare_data(recipe: SFTRecipe, env) -> None:
    """With data.train_path: your files, rendered in the base model's chat format into a cached
    bin folder (rank 0 builds, the others wait), which data.bin_dir then names."""
    from data_pipeline.processing.sft_cache import build_sft_cache
    from model.load import load_tokenizer
    from utils.distributed import barrier

    d = recipe.data
    if not d.train_path:
        return
    tok = load_tokenizer(recipe.model.init_from, d.tokenizer or None)
    build = lambda: build_sft_cache(d.train_path, d.val_path, tok, fmt=d.format, fields=d.fields,  # noqa: E731
                                    on_bad_row=d.on_bad_row, cache_root=d.cache_dir)
    if env.is_main:
        d.bin_dir = str(build())
    barrier(env)
    if not env.is_main:
        d.bin_dir = str(build())  # finds the folder rank 0 wrote


def report_long_examples(loader, recipe: SFTRecipe) -> None:
    if loader.n_long:
        action = "left out" if recipe.data.long_examples == "drop" else "cut at the end"
        print(f"sft data: {loader.n_long} example(s) longer than train.seq_len + 1 = {recipe.train.seq_len + 1} "
              f"tokens are {action} (data.long_examples: {recipe.data.long_examples})")


def tokenizer_path(recipe: SFTRecipe, required: bool = True) -> Optional[str]:
    """The recipe's data.tokenizer, else the base checkpoint's (model/load.py's one rule)."""
    from model.load import tokenizer_path as checkpoint_tokenizer

    path = checkpoint_tokenizer(recipe.model.init_from, recipe.data.tokenizer or None, required=required)
    return None if path is None else str(path)


def make_eval_fn(recipe: SFTRecipe, vocab_size: int):
    """Validation loss over assistant tokens on the first ``eval_batches`` of the val split
    (the same batches every time: a fixed seed and a fresh loader)."""
    from utils.distributed import all_reduce_mean, setup

    if not recipe.data.val_split or recipe.train.eval_batches <= 0:
        return None
    env = setup(recipe.train.distributed, recipe.train.device, recipe.train.parallel)
    make_loader(recipe, recipe.data.val_split, 0, env.dp_rank, env.dp_size, vocab_size)  # fail now, not at step 100

    def evaluate(model: nn.Module) -> dict:
        loader = make_loader(recipe, recipe.data.val_split, 0, env.dp_rank, env.dp_size)
        device = next(model.parameters()).device
        total, weight = 0.0, 0.0
        for _ in range(recipe.train.eval_batches):
            batch = [t.to(device) for t in next(loader)]
            loss, m = sft_loss(model, batch)
            total += float(loss) * m["loss_weight"]
            weight += m["loss_weight"]
        return all_reduce_mean({"val_loss": total / max(weight, 1.0)}, env)

    return evaluate


# ----------------------------------------------------------------------------- run


def run_sft(recipe: SFTRecipe, mode: str, batches: Optional[Iterator] = None, eval_fn=None):
    """Build, train and save; returns the loop's TrainResult. ``batches`` overrides the loader (tests)."""
    from model.loss import with_aux_loss
    from utils.device import resolve_device
    from utils.distributed import setup
    from utils.train_loop import train

    recipe.expect_mode(mode)
    env = setup(recipe.train.distributed, recipe.train.device, recipe.train.parallel)
    device = resolve_device(recipe.train.device, env.local_rank, "train.device")
    model, info = build_sft_model(recipe, device)
    if env.is_main:
        extra = f" | NF4 base {info['base_bytes_per_param']:.3f} bytes/param" if "base_bytes_per_param" in info else ""
        print(f"sft[{mode}]: base {recipe.model.init_from} | context {model.cfg.max_seq_len} | "
              f"trainable {info['trainable']:,} of {info['total']:,} params{extra}")
    if batches is None:
        prepare_data(recipe, env)
        batches = make_loader(recipe, "train", recipe.train.seed, env.dp_rank, env.dp_size, model.cfg.vocab_size)
        if env.is_main:
            report_long_examples(batches, recipe)
        eval_fn = eval_fn or make_eval_fn(recipe, model.cfg.vocab_size)
    meta = {"stage": f"sft_{mode}", "base_checkpoint": str(recipe.model.init_from)}
    weights_fn = None
    if recipe.lora is not None:
        weights_fn = live_adapter_weights(recipe.lora.modules_to_save)
        meta = adapter_meta(model, recipe.lora, **meta, qlora=recipe.qlora is not None, quantized=info.get("quantized", []))
    loss_fn = with_aux_loss(sft_loss, recipe.train.aux_loss, print if env.is_main else lambda _: None)
    return train(model, batches, loss_fn, recipe.train, recipe.optim, eval_fn=eval_fn, recipe=recipe,
                 weights_fn=weights_fn, checkpoint_meta=meta, tokenizer_path=tokenizer_path(recipe, required=False),
                 flops_per_token=info["flops_per_token"])


def format_report(recipe: SFTRecipe, finetuned_path: str | os.PathLike, device: str | torch.device = "cpu") -> Optional[dict]:
    """Format rate of held-out arithmetic prompts, base vs finetuned (None when switched off)."""
    from finetune.format_rate import format_rate, heldout_problems
    from model.load import load_tokenizer

    if recipe.format_eval_prompts <= 0 or tokenizer_path(recipe, required=False) is None:
        return None
    tokenizer = load_tokenizer(recipe.model.init_from, recipe.data.tokenizer or None)
    problems = heldout_problems(recipe.format_eval_prompts)
    return {name: format_rate(load_model(path, device=device), tokenizer, problems)
            for name, path in (("base", recipe.model.init_from), ("sft", finetuned_path))}


def run_sft_and_report(recipe: SFTRecipe, mode: str) -> None:
    """What the entry scripts run: train, then print where the result is and the format rate."""
    from utils.distributed import setup

    result = run_sft(recipe, mode)
    env = setup(recipe.train.distributed, recipe.train.device, recipe.train.parallel)
    if not env.is_main:
        return
    what = "adapter (LoRA weights only)" if recipe.lora is not None else "model"
    print(f"sft[{mode}]: {result.final_step} steps; {what} saved to {result.checkpoint}")
    report = format_report(recipe, result.checkpoint)
    if report:
        import json

        from utils.fs import atomic_file

        with atomic_file(Path(recipe.train.out_dir) / "format_eval.json") as f:  # read by the demo's report card
            json.dump(report, f, indent=2)
        b, s = report["base"], report["sft"]
        print(f"format rate on {s['n']} held-out arithmetic prompts ('#### <number>' last line): "
              f"base {b['format_rate']:.0%} -> SFT {s['format_rate']:.0%} (correct answers {b['accuracy']:.0%} -> {s['accuracy']:.0%})")
        print(f"example after SFT: {s['examples'][0][0]!r} -> {s['examples'][0][1]!r}")
