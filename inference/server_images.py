"""A chat request's images: OpenAI ``image_url`` parts (data URLs) -> checked pixels, and the prompt
with their placeholder tokens (data_pipeline/vision_chat.py), before anything is queued."""
from __future__ import annotations

from typing import Any

from data_pipeline.images import decode_image_url, to_pixels
from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.vision_chat import render_with_images
from inference import api_protocol as P
from utils.errors import UserError


def chat_prompt(srv: Any, req: P.ChatCompletionRequest, messages: list[dict], tools: list | None):
    """(prompt ids, pixels of the request's images or None): images arrive as image_url parts
    holding data URLs, decoded and checked (data_pipeline/images.py) before anything is queued."""
    urls = [url for m in req.messages for url in m.image_urls()]
    if not urls:
        return render_chat(srv.tokenizer, messages, add_generation_prompt=True, tools=tools)[0], None
    cfg = srv.engine.engine.model.cfg
    v = cfg.vision
    if v is not None and len(urls) * cfg.image_tokens > srv.settings.max_model_len:
        raise UserError(f"{len(urls)} images take {len(urls) * cfg.image_tokens} tokens, more than the model's "
                        f"context of {srv.settings.max_model_len}; send fewer images.")
    ids, _ = render_with_images(srv.tokenizer, messages, len(urls), v["image_token_id"] if v else None,
                                cfg.image_tokens, add_generation_prompt=True, tools=tools)
    images = [decode_image_url(url, f"image {i}") for i, url in enumerate(urls)]
    return ids, to_pixels(images, v["image_size"])
