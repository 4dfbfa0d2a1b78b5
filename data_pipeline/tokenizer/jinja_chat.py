"""A model's own Jinja chat template, rendered as ``transformers``' ``apply_chat_template`` does,
plus where the assistant's turns are in the rendered text (the spans SFT computes its loss on).

    text, spans = render_template(source, messages, add_generation_prompt=False, tools=None,
                                  special_tokens={"bos_token": "<s>", "eos_token": "</s>"})

Semantics kept from transformers: a sandboxed Jinja environment (templates from the Hub are
untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception(msg)``, ``strftime_now(fmt)``, a ``tojson`` filter that does not escape HTML,
the special tokens as variables, and ``{% generation %} ... {% endgeneration %}`` blocks marking
assistant text. The rendered text is then tokenized whole (special-token text becomes the
special ids, as in transformers).

Assistant spans: from the template's ``generation`` blocks when it has them (exactly
transformers' ``return_assistant_tokens_mask``), else by comparing renders: an assistant turn
starts where the conversation rendered up to it with ``add_generation_prompt`` stops agreeing
with the full render, and ends after the template's end-of-turn text (found by rendering a
one-turn probe). That holds for templates that rewrite earlier turns (reasoning dropped from
history), because only the turns before the one being located are rendered for its start.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Optional

from utils.errors import UserError

OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters that bracket generation blocks while rendering
_PROBE = "\ue002"


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """The template compiled in a sandbox; UserError when it does not parse."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}body{% endgeneration %}``: the body, bracketed by OPEN/CLOSE markers."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return OPEN + caller() + CLOSE

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"the chat template does not parse (line {err.lineno}: {err.message}); fix chat_template in "
                        "tokenizer_config.json (or chat_template.jinja).") from None


def render_marked(source: str, messages: list[dict], add_generation_prompt: bool, tools: Optional[list],
                  variables: dict, probe: bool = False) -> str:
    """The template's text with generation blocks bracketed by OPEN/CLOSE (UserError on a template error)."""
    import jinja2

    for m in [] if probe else messages:
        if any(c in str(m.get("content", "")) for c in (OPEN, CLOSE, _PROBE)):
            raise UserError("a message contains a private-use character (U+E000-U+E002) that the chat renderer reserves; remove it.")
    try:
        return compile_template(source).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                               **variables)
    except jinja2.exceptions.TemplateError as err:  # includes the template's own raise_exception
        raise UserError(f"the chat template refused these messages: {err}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
        raise UserError(f"the chat template failed on these messages ({type(err).__name__}: {err}); check the "
                        "message fields (role, content) the template expects.") from None


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the OPEN/CLOSE markers; return the clean text and the (start, end) spans they bracketed."""
    out, spans, start = [], [], None
    pos = 0
    for ch in text:
        if ch == OPEN:
            start = pos
        elif ch == CLOSE:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            out.append(ch)
            pos += 1
    return "".join(out), spans


def render_template(source: str, messages: list[dict], add_generation_prompt: bool = False,
                    tools: Optional[list] = None, special_tokens: Optional[dict] = None) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant spans as character ranges of text) for a conversation."""
    variables = dict(special_tokens or {})
    marked = render_marked(source, messages, add_generation_prompt, tools, variables)
    text, spans = _unmark(marked)
    if OPEN in marked or "{% generation" in source or "{%- generation" in source:
        return text, spans
    return text, _spans_by_prefix(source, messages, text, tools, variables)


def _spans_by_prefix(source: str, messages: list[dict], text: str, tools: Optional[list], variables: dict) -> list[tuple[int, int]]:
    """Assistant spans of a template without generation blocks (see the module docstring)."""
    end_marker = _end_of_turn(source, tools, variables)
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant" or k == 0:
            continue
        prompt = _unmark(render_marked(source, messages[:k], True, tools, variables))[0]
        start = _common_prefix(prompt, text)
        end = text.find(end_marker, start) if end_marker else -1
        if end >= 0:
            end += len(end_marker)
        else:  # no end-of-turn text: the turn ends where the next render (up to this turn) stops agreeing
            upto = _unmark(render_marked(source, messages[: k + 1], False, tools, variables))[0]
            end = _common_prefix(upto, text)
        if end > start:
            spans.append((start, end))
    return spans


def _end_of_turn(source: str, tools: Optional[list], variables: dict) -> str:
    """What the template writes after an assistant's text (e.g. ``<|im_end|>``), without trailing whitespace."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = _unmark(render_marked(source, probe, False, tools, variables, probe=True))[0]
    except UserError:
        return ""
    return text.split(_PROBE, 1)[1].rstrip() if _PROBE in text else ""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose character range overlaps an assistant span (both in text order),
    as transformers computes ``assistant_masks``."""
    mask, s = [0] * len(offsets), 0
    for i, (a, b) in enumerate(offsets):
        while s < len(spans) and a >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if b > spans[s][0]:
            mask[i] = 1
    return mask
