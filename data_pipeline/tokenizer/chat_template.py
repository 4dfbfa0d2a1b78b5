"""THE chat format: one function turns messages into token ids and the assistant loss mask.

Format (ChatML-like)::

    <|bos|><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ...

SFT, preference data, RL rollouts, the server and eval all call ``render_chat``,
so train and serve cannot disagree on the template. The format belongs to the tokenizer:
this one for tokenizers trained here, an imported model's own Jinja template otherwise
(``render_chat`` dispatches to ``tok.render_chat``). The assistant mask is 1 on
each assistant message's content tokens and on its closing ``<|im_end|>`` (the
model learns to stop), 0 everywhere else.

Header, content and the trailing newline are encoded separately, so message
text can never merge with the template's tokens. ``HF_CHAT_TEMPLATE`` is the
same format as a Jinja template for ``transformers`` (apply_chat_template gives
the same ids for content that does not start with whitespace; tested).
"""
from __future__ import annotations

import json

from utils.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
# The project format's function calling, in text (the tokenizer's ids 0..4 are fixed, so no new special
# tokens): the assistant writes each call as TOOL_OPEN {"name": ..., "arguments": {...}} TOOL_CLOSE, and
# a result comes back as a "tool" turn. Hermes/Qwen-style models use the same markers.
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

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


def _piece(tok, text: str) -> list[int]:
    """Ids of a fixed template piece ('user\\n', '\\n', ...), cached per tokenizer."""
    key = (getattr(tok, "hash", str(id(tok))), text)
    if key not in _TEMPLATE_IDS:
        _TEMPLATE_IDS[key] = tok.encode(text)
    return _TEMPLATE_IDS[key]


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False,
                tools: list | None = None) -> tuple[list[int], list[int]]:
    """THE entry point: a conversation in the tokenizer's own chat format -> (ids, assistant mask).

    The format belongs to the tokenizer: the project's format below for tokenizers trained here,
    an imported model's Jinja template for its HFTokenizer (data_pipeline/tokenizer/hf_tokenizer.py).
    The mask is 1 on the assistant's tokens (content and the end-of-turn token that closes it).
    """
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError("messages must be a non-empty list of {'role', 'content'} dicts")
    return tok.render_chat(messages, add_generation_prompt, tools)


def chat_stop_ids(tok) -> list[int]:
    """Ids that end an assistant reply during generation (the tokenizer's end-of-turn and EOS ids)."""
    return list(tok.chat_stop_ids)


def tools_prompt(tools: list[dict]) -> str:
    """The system text that offers functions to the model, in the project's format."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False, sort_keys=True) for t in tools]
    return ("You can call these functions. To call one, write " + TOOL_OPEN
            + '{"name": <function name>, "arguments": <an object of its parameters>}' + TOOL_CLOSE
            + " for each call and nothing else.\nFunctions:\n" + "\n".join(lines))


def call_text(call: dict) -> str:
    """One OpenAI tool call ({"function": {"name", "arguments": JSON text or object}}) as the model writes it."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise UserError(f"tool call {fn.get('name')!r} has arguments that are not JSON: {args[:80]!r}") from None
    return TOOL_OPEN + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + TOOL_CLOSE


def with_tools(messages: list[dict], tools: list | None) -> list[dict]:
    """Messages with OpenAI function calling folded into plain turns of the project's format:
    the tools into the system turn, an assistant's tool_calls into its text, tool results as "tool" turns."""
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
            text = (m.get("content") or "") + "".join(call_text(c) for c in m["tool_calls"])
            m = {"role": "assistant", "content": text}
        elif isinstance(m, dict):
            m = {"role": m.get("role"), "content": m.get("content")}
        out.append(m)
    if tools:
        offer = tools_prompt(tools)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + offer}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out
def generation_prompt_ids(tok) -> list[int]:
    """The ids ``add_generation_prompt`` appends (the header that opens an assistant reply), found by
    rendering a one-message chat with and without it; [] when the tokenizer has no chat format or
    its template does not add a plain suffix. A raw prompt ending in these ids asks for a reply."""
    probe = [{"role": "user", "content": "Hi"}]
    try:
        opened, _ = render_chat(tok, probe, add_generation_prompt=True)
        closed, _ = render_chat(tok, probe, add_generation_prompt=False)
    except UserError:
        return []
    if len(opened) <= len(closed) or opened[: len(closed)] != closed:
        return []
    return opened[len(closed) :]


def render_project_chat(tok, messages: list[dict],
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render a conversation in the project's own format.

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
