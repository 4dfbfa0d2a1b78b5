"""Vision-language training (LLaVA): the model, what each stage trains, the data, the loss -> THE loop.

    stage text      the LM on the chats without their images (a text-only base to compare with)
    stage align     (LLaVA stage 1) the projector alone on captions: image tokens learn to speak the
                    frozen LM's embedding language
    stage instruct  (LLaVA stage 2) projector + LM on visual questions

The vision tower stays frozen throughout (``train_tower`` lets stage 2 train it). With a ``lora``
section stage 2 trains adapters on the language model's linear layers and the projector in full,
and saves those alone (an adapter checkpoint over the stage-1 model; the loader merges it). The
loss is the assistant-only next-token loss of SFT with the image embeddings spliced in at the
placeholder ids (``Transformer.forward``).
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from data_pipeline.images import to_pixels
from data_pipeline.user_data import read_rows
from data_pipeline.vision_chat import drop_images, render_with_images, row_chat
from finetune.vlm_recipe import VLMRecipe
from model import ModelConfig, Transformer
from model.hf_vision import tower_from_siglip_dir
from model.lora import LoRAConfig
from model.kernels import linear_cross_entropy
from utils.errors import UserError


# ----------------------------------------------------------------------------- model
def build_vlm(recipe: VLMRecipe) -> Transformer:
    """The model to train: a fresh one (model.config), a VLM checkpoint, or a text checkpoint with a
    fresh vision tower + projector (model.vision) around its unchanged weights."""
    from model.load import load_model

    m = recipe.model
    if m.config is not None:
        cfg = ModelConfig.from_dict(m.config)
        if cfg.vision is None:
            raise UserError("model.config has no vision section; a vision-language model needs one.")
        return Transformer(cfg)
    base = load_model(m.init_from, train=True)
    if base.cfg.vision is not None:
        if m.vision is not None:
            raise UserError(f"{m.init_from} already has a vision part; remove model.vision from the recipe.")
        return base
    if m.vision is None:
        raise UserError(f"{m.init_from} is a text-only model; add model.vision (the vision tower and projector to "
                        "put in front of it).")
    vision, tower = dict(m.vision), None
    if m.vision_tower:  # a pretrained tower: its sizes replace the section's, its weights the fresh ones
        sizes, tower = tower_from_siglip_dir(m.vision_tower, post_norm=bool(vision.get("post_norm", False)))
        clash = {k: (vision[k], v) for k, v in sizes.items() if k in vision and vision[k] != v}
        if clash:
            raise UserError(f"model.vision sets {', '.join(f'{k}={a!r}' for k, (a, _) in clash.items())} but the tower in "
                            f"{m.vision_tower} has {', '.join(f'{k}={b!r}' for k, (_, b) in clash.items())}; "
                            "leave the tower's sizes out of model.vision.")
        vision.update(sizes)
    model = Transformer(ModelConfig.from_dict({**base.cfg.to_dict(), "vision": vision}))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vision.") for k in missing), (missing, unexpected)
    if tower is not None:
        model.vision.tower.load_state_dict(tower, strict=True)
    return model


def apply_vlm_lora(model: Transformer, recipe: VLMRecipe) -> LoRAConfig:
    """Adapters on the language model's linear layers that ``lora.targets`` selects (never the
    vision tower's: its q/k/v share the names), the projector (and the tower with train_tower)
    trained in full beside them; returns the LoRA settings the adapter checkpoint records."""
    from model.linear_layers import match_linears
    from model.lora import apply_lora

    lc = recipe.lora
    names = [n for n in match_linears(model, lc.targets) if not n.startswith("vision.")]
    if not names:
        raise UserError(f"lora.targets {lc.targets!r} selects no layer of the language model (only vision layers).")
    full = ["vision.projector"] + (["vision.tower"] if recipe.train_tower else [])
    lc = replace(lc, modules_to_save=[*lc.modules_to_save, *[m for m in full if m not in lc.modules_to_save]])
    apply_lora(model, names, lc.r, lc.alpha, lc.dropout, lc.rslora, lc.modules_to_save)
    return lc


def trainable(model: Transformer, stage: str, train_tower: bool = False) -> list[nn.Parameter]:
    """Set requires_grad for ``stage`` and return the parameters that train."""
    for name, p in model.named_parameters():
        if name.startswith("vision.tower."):
            p.requires_grad_(train_tower)  # LLaVA keeps its pretrained encoder frozen in both stages
        elif name.startswith("vision.projector."):
            p.requires_grad_(stage in ("align", "instruct"))
        else:
            p.requires_grad_(stage in ("text", "instruct"))
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- data
def encode_rows(path: str, image_dir: str, tok, cfg: ModelConfig, seq_len: int, with_images: bool) -> list[dict]:
    """Every row of the JSONL as {"ids", "mask", "pixels" (n_images, 3, S, S)}; rows longer than
    seq_len + 1 tokens are an error (an image cut in half would have no meaning)."""
    base = Path(image_dir) if image_dir else Path(path).parent
    v = cfg.vision
    rows = []
    for where, row in read_rows(path):
        messages, images = row_chat(row, base, where)
        if not with_images:
            messages, images = drop_images(messages), []
        ids, mask = render_with_images(tok, messages, len(images), v["image_token_id"], cfg.image_tokens)
        if len(ids) > seq_len + 1:
            raise UserError(f"{where} is {len(ids)} tokens ({len(images)} image(s) of {cfg.image_tokens}); "
                            f"raise train.seq_len to at least {len(ids) - 1}.")
        if len(ids) > cfg.max_seq_len + 1:
            raise UserError(f"{where} is {len(ids)} tokens ({len(images)} image(s) of {cfg.image_tokens}) but the model's "
                            f"context (max_seq_len) is {cfg.max_seq_len}; shorten the row or start from a model with a "
                            "longer context.")
        rows.append({"ids": ids, "mask": mask, "pixels": to_pixels(images, v["image_size"])})
    if not rows:
        raise UserError(f"{path} holds no rows.")
    return rows


class ImageChatBatches:
    """Shuffled micro-batches of rows, padded to the longest: {"x", "y", "pixels"}; endless, and
    resumable (state: epoch and position)."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int, pad_id: int):
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        picked = []
        while len(picked) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            picked.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return collate(picked, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def collate(rows: list[dict], pad_id: int) -> dict:
    """Inputs x (B, T), targets y (B, T) (-100 outside the assistant's tokens), pixels (N, 3, S, S)
    of the batch's images in row order (the order of their placeholders in x)."""
    T = max(len(r["ids"]) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        ids, mask = torch.tensor(r["ids"]), torch.tensor(r["mask"], dtype=torch.bool)
        n = len(ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(mask[1:], ids[1:], -100)
    return {"x": x, "y": y, "pixels": torch.cat([r["pixels"] for r in rows])}


# ----------------------------------------------------------------------------- loss
def vlm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token CE over the assistant's tokens, images spliced in."""
    x, y, pixels = batch["x"], batch["y"], batch["pixels"]
    embeds = model.encode_images(pixels) if pixels.shape[0] else None
    hidden = model(x, return_hidden=True, image_embeds=embeds).flatten(0, 1)  # (B*T, d_model)
    targets = y.flatten()
    counted = targets != -100
    loss = linear_cross_entropy(hidden[counted], model.lm_head.weight, targets[counted],
                                softcap=model.cfg.final_logit_softcap)
    return loss, {"n_tokens": x.numel(), "loss_weight": int(counted.sum())}


# ----------------------------------------------------------------------------- the stage
def run_vlm(recipe: VLMRecipe, batches: Optional[Iterator] = None):
    """Build, freeze for the stage, train through the one loop, save; returns the TrainResult."""
    from model.load import load_tokenizer, tokenizer_path
    from data_pipeline.tokenizer.tokenizer import load_tokenizer as load_tok_file
    from model.loss import with_aux_loss
    from utils.train_loop import train

    model = build_vlm(recipe)
    if recipe.data.tokenizer:
        tok_path = Path(recipe.data.tokenizer)
        tok = load_tok_file(tok_path)
    else:
        tok, tok_path = load_tokenizer(recipe.model.init_from), tokenizer_path(recipe.model.init_from)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model's vocab_size is {model.cfg.vocab_size}.")
    meta = {"stage": f"vlm_{recipe.stage}", "base_checkpoint": recipe.model.init_from}
    weights_fn = None
    if recipe.lora is not None:
        from model.lora import adapter_meta, live_adapter_weights, trainable_parameters

        lc = apply_vlm_lora(model, recipe)
        params = trainable_parameters(model)
        weights_fn = live_adapter_weights(lc.modules_to_save)
        meta = adapter_meta(model, lc, **meta)
    else:
        params = trainable(model, recipe.stage, recipe.train_tower)
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print(f"vlm[{recipe.stage}]: {recipe.model.init_from or 'fresh model'} | {model.cfg.image_tokens} tokens per image | "
          f"trainable {n_train:,} of {n_all:,} params")
    if batches is None:
        rows = [row for path in [recipe.data.train_path, *recipe.data.extra_paths]
                for row in encode_rows(path, recipe.data.image_dir, tok, model.cfg, recipe.train.seq_len,
                                       with_images=recipe.stage != "text")]
        batches = ImageChatBatches(rows, recipe.train.batch_size, recipe.train.seed, tok.eos_id)
    loss_fn = with_aux_loss(vlm_loss, recipe.train.aux_loss)  # an MoE language model's balance loss
    return train(model, batches, loss_fn, recipe.train, recipe.optim, recipe=recipe, params=params,
                 weights_fn=weights_fn, checkpoint_meta=meta, tokenizer_path=str(tok_path))
