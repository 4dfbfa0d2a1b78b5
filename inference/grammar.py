"""Constrained decoding: a sequence may only produce what a grammar accepts (structured output,
forced tool calls). The grammar is compiled by llguidance (measured against outlines-core in
bench/bench_grammar.py; see docs/BENCHMARKS.md) into one matcher per sequence; each decoding step
the engine masks that sequence's logits to the tokens the matcher allows, samples, and feeds the
token back. When the grammar is complete only the tokenizer's end-of-turn ids stay allowed, so the
reply ends with finish_reason "stop".

    spec = {"json_schema": {...}} | {"json_object": True} | {"regex": "..."} | {"lark": "..."}
    grammar = compile_grammar(tokenizer, spec)     # UserError for a schema/grammar it cannot compile
    m = grammar.matcher()                           # per sequence
    logits[~m.allowed(V)] = -inf; ...; m.accept(token)
"""
from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch

from utils.errors import UserError

KINDS = ("json_schema", "json_object", "regex", "lark")
# Compact JSON: no free whitespace between tokens (a random or weak model would otherwise spend its
# budget on newlines the grammar allows); "strict" schema semantics (additionalProperties respected).
JSON_OPTIONS = {"whitespace_flexible": False}


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(path: str, stop_ids: tuple[int, ...]) -> Any:
    from llguidance import LLTokenizer

    return LLTokenizer(path, eos_token=list(stop_ids))


def _grammar_text(spec: dict) -> str:
    from llguidance import LLMatcher

    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise UserError(f"a grammar needs exactly one of {', '.join(KINDS)}, got {sorted(spec)}.")
    kind = kinds[0]
    try:
        if kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(spec["json_schema"], overrides=JSON_OPTIONS)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec["regex"])
        return LLMatcher.grammar_from_lark(spec["lark"])
    except (ValueError, TypeError) as err:
        raise UserError(f"the {kind} cannot be compiled into a grammar ({err}).") from None


class Matcher:
    """One sequence's position in the grammar."""

    def __init__(self, ll_matcher: Any, vocab: int):
        self._m, self._vocab = ll_matcher, vocab

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar accepts next (ids past the tokenizer's: never)."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool)
        out = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, mask.size)
        out[:n] = torch.from_numpy(mask[:n])
        return out

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar did not allow it (a bug upstream)."""
        return bool(self._m.consume_token(token))

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


class Grammar:
    """A compiled grammar for one tokenizer; ``matcher()`` starts a sequence at its beginning."""

    def __init__(self, ll_tokenizer: Any, text: str):
        from llguidance import LLMatcher

        self._tok, self._text = ll_tokenizer, text
        probe = LLMatcher(ll_tokenizer, text, log_level=0)
        if probe.is_error():
            raise UserError(f"the grammar is not valid: {probe.get_error()}")

    def matcher(self) -> Matcher:
        from llguidance import LLMatcher

        return Matcher(LLMatcher(self._tok, self._text, log_level=0), self._tok.vocab_size)


def compile_grammar(tokenizer: Any, spec: dict) -> Grammar:
    """``spec`` (see the module docstring) compiled for ``tokenizer`` (the project's or an imported
    model's: both name their tokenizer.json), ending at its chat stop ids."""
    if tokenizer is None or not getattr(tokenizer, "path", None):
        raise UserError("constrained decoding needs the model's tokenizer (a tokenizer.json).")
    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise UserError("structured output needs llguidance (pip install llguidance; it is in requirements.txt).") from None
    stops = tuple(getattr(tokenizer, "chat_stop_ids", None) or [tokenizer.eos_id])
    return Grammar(_ll_tokenizer(str(tokenizer.path), stops), _grammar_text(spec))


def schema_of(response_format: Any) -> dict:
    """The grammar spec of an OpenAI ``response_format`` ({"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}})."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        body = response_format.get("json_schema") or {}
        schema = body.get("schema")
        if not isinstance(schema, dict):
            raise UserError("response_format.json_schema.schema must be a JSON Schema object.")
        return {"json_schema": json.loads(json.dumps(schema))}
    raise UserError(f"response_format.type={kind!r} is not supported; use text, json_object or json_schema.")
