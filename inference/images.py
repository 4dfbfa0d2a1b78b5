"""Images in the engine: encoded once per request, spliced into whichever forward computes them.

A request's images are run through the vision encoder when it is added (once per image, never
again: preemption and recompute reuse the embeddings). Their tokens sit in the prompt as
placeholder ids and occupy KV blocks like text. A prefill chunk that covers some placeholders
gets exactly their rows of the embeddings. Prefix caching stays correct because a sequence's
block hashes start from a digest of its images' pixels: two prompts share cached blocks only
when their tokens and their images are the same.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from utils.errors import UserError


@dataclass
class ImageInputs:
    embeds: torch.Tensor  # (n_images * image_tokens, d_model), in placeholder order
    positions: list[int]  # prompt indices of the placeholders, ascending
    digest: int  # a hash of the pixels: the root of the sequence's prefix-cache hashes


def prepare_images(model: torch.nn.Module, prompt_ids: list[int], pixels: Optional[torch.Tensor]) -> Optional[ImageInputs]:
    """Check a request's images against its prompt and encode them; None for a text request.

    pixels (n, C, H, W) in [-1, 1]. UserError: images for a text-only model, or a count of
    placeholder tokens that is not n * image_tokens."""
    cfg = model.cfg
    if pixels is None or pixels.shape[0] == 0:
        if cfg.vision is not None and cfg.vision["image_token_id"] in prompt_ids:
            raise UserError(f"the prompt holds image placeholder tokens (id {cfg.vision['image_token_id']}) but no images.")
        return None
    if cfg.vision is None:
        raise UserError("this model has no vision encoder, so it cannot read images; send text only, or serve "
                        "a vision-language model.")
    want = (cfg.vision["n_channels"], cfg.vision["image_size"], cfg.vision["image_size"])
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
        raise UserError(f"images must be (n, {want[0]}, {want[1]}, {want[2]}) pixel tensors, got {tuple(pixels.shape)}.")
    positions = [i for i, t in enumerate(prompt_ids) if t == cfg.vision["image_token_id"]]
    if len(positions) != pixels.shape[0] * cfg.image_tokens:
        raise UserError(f"{pixels.shape[0]} image(s) need {pixels.shape[0] * cfg.image_tokens} placeholder tokens "
                        f"({cfg.image_tokens} each) in the prompt, found {len(positions)}.")
    device = next(model.parameters()).device
    with torch.inference_mode():
        embeds = model.encode_images(pixels.to(device))
    digest = int.from_bytes(hashlib.sha256(pixels.float().cpu().numpy().tobytes()).digest()[:8], "big")
    return ImageInputs(embeds, positions, digest)


def chunk_images(images: list[Optional[ImageInputs]], starts: list[int], q_lens: list[int],
                 T: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """For a forward whose row b computes positions [starts[b], starts[b] + q_lens[b]) (padded to T):
    (image_mask (B, T) bool, image_embeds (N, d)) of the placeholders it covers; None if it covers none."""
    mask = torch.zeros(len(images), T, dtype=torch.bool)
    parts = []
    for b, (img, s, q) in enumerate(zip(images, starts, q_lens)):
        if img is None:
            continue
        lo, hi = bisect.bisect_left(img.positions, s), bisect.bisect_left(img.positions, s + q)
        if lo == hi:
            continue
        mask[b, [p - s for p in img.positions[lo:hi]]] = True
        parts.append(img.embeds[lo:hi])
    if not parts:
        return None
    return mask, torch.cat(parts)
