"""Function calling at the text edge: what the model writes when it calls a tool, read back into
OpenAI ``tool_calls``, and the grammar that forces a call when a request requires one.

A call is written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the project's chat
format, see data_pipeline/tokenizer/chat_template.py, and the Hermes/Qwen convention many imported
models were trained on). A reply that is only a JSON object with "name" and "arguments" (or
"parameters", Llama-3.1's way) counts as one call too.

    content, calls = parse_tool_calls(text)               # calls: [{"id", "type", "function": {...}}]
    grammar = forced_call_grammar(tools, name="get_weather")   # tool_choice "required" or a named function
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from data_pipeline.tokenizer.chat_template import TOOL_CLOSE, TOOL_OPEN
from utils.errors import UserError


def new_call(name: str, arguments: Any) -> dict:
    """An OpenAI tool call: arguments as JSON text, as the API sends them."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _as_call(obj: Any) -> Optional[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return new_call(obj["name"], args) if isinstance(args, dict) else None


def parse_tool_calls(text: str) -> tuple[Optional[str], list[dict]]:
    """(the text outside the calls, or None when nothing else was said; the calls in order).
    A malformed call stays in the text: the client sees what the model wrote."""
    calls, rest, pos = [], [], 0
    while (start := text.find(TOOL_OPEN, pos)) >= 0:
        end = text.find(TOOL_CLOSE, start)
        if end < 0:
            break
        try:
            call = _as_call(json.loads(text[start + len(TOOL_OPEN): end]))
        except json.JSONDecodeError:
            call = None
        if call is None:
            rest.append(text[pos: end + len(TOOL_CLOSE)])
        else:
            rest.append(text[pos:start])
            calls.append(call)
        pos = end + len(TOOL_CLOSE)
    rest.append(text[pos:])
    content = "".join(rest)
    if not calls:
        stripped = text.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            try:
                bare = _as_call(json.loads(stripped))
            except json.JSONDecodeError:
                bare = None
            if bare is not None:
                return None, [bare]
    return (content if content.strip() else None), calls


def check_tools(tools: list[dict], tool_choice: Any) -> Optional[str]:
    """Validate a request's tools and tool_choice; returns the function name a named choice forces."""
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}.")
        names.append(fn["name"])
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise UserError(f"tool_choice names function {name!r}, which is not among the tools {names}.")
        return name
    return None


def forced_call_grammar(tools: list[dict], name: Optional[str] = None) -> dict:
    """A Lark grammar (inference/grammar.py) for exactly one call of ``name`` (or of any of the
    tools): the markers around a JSON object whose arguments follow the function's schema."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": fn["name"]}, "arguments": params}})
    schema = {"x-guidance": {"whitespace_flexible": False}, **(options[0] if len(options) == 1 else {"anyOf": options})}
    return {"lark": f"start: {json.dumps(TOOL_OPEN)} call {json.dumps(TOOL_CLOSE)}\ncall: %json {json.dumps(schema)}"}


def for_template(messages: list[dict]) -> list[dict]:
    """OpenAI messages as Jinja chat templates expect them: a tool call's arguments as an object
    (transformers' convention), not JSON text."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except json.JSONDecodeError:
                        raise UserError(f"tool call {fn.get('name')!r} has arguments that are not JSON.") from None
                calls.append({**c, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


class CallSplitter:
    """Streams a reply's plain text while holding back whatever may be a tool call, which is
    only complete (and parsed) at the end."""

    def __init__(self) -> None:
        self.seen, self.sent = "", 0

    def feed(self, piece: str) -> str:
        """The text that can go out now."""
        self.seen += piece
        start = self.seen.find(TOOL_OPEN)
        if self.seen.lstrip().startswith("{"):
            safe = 0  # a reply that opens with "{" may be a bare JSON call: hold it to the end
        elif start >= 0:
            safe = start
        else:  # keep back a tail that could be the start of the marker
            safe = len(self.seen)
            for k in range(min(len(TOOL_OPEN) - 1, len(self.seen)), 0, -1):
                if TOOL_OPEN.startswith(self.seen[-k:]):
                    safe = len(self.seen) - k
                    break
        out, self.sent = self.seen[self.sent: max(safe, self.sent)], max(safe, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the plain text, the calls) once the reply is complete."""
        content, calls = parse_tool_calls(self.seen[self.sent:])
        if calls:
            return content or "", calls
        return self.seen[self.sent:], []
