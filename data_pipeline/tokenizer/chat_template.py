"""THE chat format: one function turns messages into token ids and the assistant loss mask.

Format (ChatML-like)::

    <|bos|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ...

SFT, preference data, RL rollouts, the server and eval all call ``render_chat``,
so train and serve cannot disagree on the template. The assistant mask is 1 on
each assistant message's content tokens and on its closing ``<|im_end|>`` (the
model learns to stop), 0 everywhere else.

Header, content and the trailing newline are encoded separately, so message
text can never merge with the template's tokens. ``HF_CHAT_TEMPLATE`` is the
same format as a Jinja template for ``transformers`` (apply_chat_template gives
the same ids for content that does not start with whitespace; tested).
"""
from __future__ import annotations

from data_pipeline.tokenizer.tokenizer import Tokenizer
from utils.errors import UserError

ROLES = ("system", "user", "assistant")

HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _validate(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, "
                        f"got {type(messages).__name__}{'' if messages else ' (empty)'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"messages[{i}] must be a dict with 'role' and 'content', "
                            f"got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise UserError(f"messages[{i}] has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}] ({m['role']}) content must be a string, "
                            f"got {type(m.get('content')).__name__}")


_TEMPLATE_IDS: dict[tuple[str, str], list[int]] = {}


def _piece(tok: Tokenizer, text: str) -> list[int]:
    """Ids of a fixed template piece ('user\\n', '\\n', ...), cached per tokenizer."""
    key = (getattr(tok, "hash", str(id(tok))), text)
    if key not in _TEMPLATE_IDS:
        _TEMPLATE_IDS[key] = tok.encode(text)
    return _TEMPLATE_IDS[key]


def render_chat(tok: Tokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render a conversation.

    Args: tok, the project tokenizer; messages, [{"role": system|user|assistant,
    "content": str}, ...]; add_generation_prompt appends ``<|im_start|>assistant\\n``
    so the model writes the next assistant message.
    Returns: (ids, assistant_mask), two lists of the same length; mask[i] == 1
    when ids[i] is assistant content or the ``<|im_end|>`` closing it.
    """
    _validate(messages)
    newline = _piece(tok, "\n")
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        header = [tok.im_start_id] + _piece(tok, m["role"] + "\n")
        body = tok.encode(m["content"]) + [tok.im_end_id]
        learn = 1 if m["role"] == "assistant" else 0
        ids += header + body + newline
        mask += [0] * len(header) + [learn] * len(body) + [0] * len(newline)
    if add_generation_prompt:
        header = [tok.im_start_id] + _piece(tok, "assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask


def chat_stop_ids(tok: Tokenizer) -> list[int]:
    """Ids that end an assistant reply during generation: <|im_end|>, <|endoftext|>."""
    return [tok.im_end_id, tok.eos_id]
