"""Chats with images: content parts -> the tokenizer's chat format with image placeholder tokens.

A message's content may be a string or OpenAI content parts::

    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},   # the server, a client
     {"type": "image", "image": "pics/0001.png"},                               # a JSONL row's file
     {"type": "text", "text": "How many shapes are there?"}]

or a string with ``<image>`` markers and the files in the row's ``images`` list (the LLaMA-Factory
layout). A dataset row may also be in LLaVA's published layout (LLaVA-Pretrain, LLaVA-Instruct),
``{"image": "000000033471.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat ..."},
{"from": "gpt", "value": "..."}]}``; ``row_chat`` reads either. ``split_images`` turns the messages
into plain-text ones (each image a ``<image>`` marker) plus the decoded images in order;
``render_with_images`` renders those through THE chat format (``render_chat``) and replaces each
marker's tokens with the model's ``image_tokens`` placeholder ids, which the model fills with the
image's embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from data_pipeline.images import decode_image_url, load_image_file
from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.user_data import FIELDS, to_messages
from utils.errors import UserError

IMAGE_MARKER = "<image>"


def split_images(messages: list, row_images: Optional[list] = None, base_dir: Optional[Path] = None,
                 where: str = "messages", allow_files: bool = True) -> tuple[list[dict], list[np.ndarray]]:
    """(messages with string content, an ``<image>`` marker per image; the images, (H, W, 3) uint8).

    ``row_images``: the row's images (file paths relative to ``base_dir``, or arrays), taken in order
    by ``<image>`` markers and by ``{"type": "image"}`` parts that carry no image of their own.
    ``allow_files=False`` (the server) accepts only data URLs."""
    if not isinstance(messages, list):
        raise UserError(f"{where} must be a list of messages.")
    pending = list(row_images or [])
    images: list[np.ndarray] = []

    def take(ref, what: str) -> np.ndarray:
        if isinstance(ref, np.ndarray):
            return ref
        if isinstance(ref, dict):  # {"url": ...} of an image_url part
            ref = ref.get("url")
        if (isinstance(ref, str) and ref.startswith("data:")) or not allow_files:
            return decode_image_url(ref, what)
        if not isinstance(ref, str):
            raise UserError(f"{what} must be a file path or a data URL, got {type(ref).__name__}.")
        return load_image_file((base_dir or Path(".")) / ref, f"{what}: ")

    def next_row_image(what: str) -> np.ndarray:
        if not pending:
            raise UserError(f"{what} has no image: the row's 'images' list is shorter than its image markers.")
        return take(pending.pop(0), what)

    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}[{i}] must be a dict with 'role' and 'content'.")
        content = m.get("content")
        if isinstance(content, str):
            for k in range(content.count(IMAGE_MARKER)):
                images.append(next_row_image(f"{where}[{i}] image {k}"))
            out.append({**m, "content": content})
            continue
        if not isinstance(content, list):
            raise UserError(f"{where}[{i}] content must be a string or a list of content parts.")
        text = []
        for j, part in enumerate(content):
            what = f"{where}[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise UserError(f"{what} (text) needs a string 'text'.")
                text.append(part["text"])
            elif kind in ("image_url", "image"):
                ref = part.get(kind)
                images.append(take(ref, what) if ref is not None else next_row_image(what))
                text.append(IMAGE_MARKER + "\n")
            else:
                raise UserError(f"{what} has type {kind!r}; content parts are text, image_url or image.")
        out.append({**m, "content": "".join(text)})
    if pending:
        raise UserError(f"{where}: {len(pending)} of the row's images have no <image> marker or image part.")
    return out, images


def row_chat(row: dict, base_dir: Optional[Path], where: str) -> tuple[list[dict], list[np.ndarray]]:
    """A dataset row -> ``split_images``' (messages, images). The row holds ``messages`` (OpenAI chat,
    content parts or ``<image>`` markers) or ``conversations`` (LLaVA / ShareGPT turns), and its image
    files in ``images`` (a list) or ``image`` (LLaVA: one file, or a list)."""
    images = row.get("images", row.get("image"))
    images = [images] if isinstance(images, str) else images
    if images is not None and not isinstance(images, list):
        raise UserError(f"{where}: 'images' must be a list of image files, got {type(images).__name__}.")
    if "messages" in row:
        messages = row["messages"]
    elif "conversations" in row:
        try:
            messages = to_messages(row, "sharegpt", FIELDS)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    else:
        raise UserError(f"{where} has keys {sorted(row)[:8]}; an image-chat row holds 'messages' (OpenAI chat) or "
                        "'conversations' (LLaVA), with its image files in 'images' or 'image'.")
    return split_images(messages, images, base_dir, where)


def drop_images(messages: list[dict]) -> list[dict]:
    """``split_images``' messages as a text-only model sees them: the image markers removed."""
    return [{**m, "content": m["content"].replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "")} for m in messages]


def render_with_images(tok, messages: list[dict], n_images: int, image_token_id: Optional[int], image_tokens: int,
                       add_generation_prompt: bool = False, tools: Optional[list] = None) -> tuple[list[int], list[int]]:
    """``render_chat`` of messages carrying ``<image>`` markers, each marker's tokens replaced by
    ``image_tokens`` copies of ``image_token_id`` (assistant mask 0 there). A text-only model
    (``image_token_id`` None) refuses images."""
    if n_images and image_token_id is None:
        raise UserError("this model has no vision encoder, so it cannot read images; send text only, "
                        "or use a vision-language model (model.vision set).")
    ids, mask = render_chat(tok, messages, add_generation_prompt, tools)
    if not n_images:
        return ids, mask
    marker = tok.encode(IMAGE_MARKER)
    out_ids, out_mask, i, found = [], [], 0, 0
    while i < len(ids):
        if ids[i : i + len(marker)] == marker:
            out_ids += [image_token_id] * image_tokens
            out_mask += [0] * image_tokens
            i += len(marker)
            found += 1
        else:
            out_ids.append(ids[i])
            out_mask.append(mask[i])
            i += 1
    if found != n_images:
        raise UserError(f"the chat holds {n_images} image(s) but {found} {IMAGE_MARKER} marker(s) survived tokenization; "
                        f"keep the text '{IMAGE_MARKER}' out of messages, or put each marker at the start of a line.")
    return out_ids, out_mask
