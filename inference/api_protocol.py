"""The OpenAI wire format: request and response models for the server.

Requests are validated strictly (a string where a number belongs is a 400, not a silent
coercion); a field this server does not support is a 400 naming it, never silently dropped
(a few that change nothing about the reply, like ``user`` or ``metadata``, are accepted). A field
sent as ``null`` means its default, as the OpenAI API allows.
Responses are plain pydantic models dumped to JSON; streaming chunks reuse the same shapes.
Only the fields this server understands are declared; everything here is data, no logic
beyond range checks.
"""
from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_pipeline.vision_chat import IMAGE_MARKER

# ----------------------------------------------------------------------------- requests


# Fields a client may send that change nothing about the reply: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class _Strict(BaseModel):
    # strict: "0.5" is not a float, true is not an int; NaN/inf are not sampling values.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None and k not in IGNORED}
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # a data URL (data:image/png;base64,...); remote URLs are refused when the image is decoded
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is resized to the model's size


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the API sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called functions
    tool_call_id: str | None = None  # a tool turn: which call this is the result of

    def text(self) -> str:
        """The message text; a list of parts is joined, each image a ``<image>`` marker line
        (data_pipeline/vision_chat.py turns the markers into the image's placeholder tokens)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextPart) else IMAGE_MARKER + "\n" for part in self.content)

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]

    def as_dict(self) -> dict:
        """The message for the chat template: role, text, and the function-calling fields it has."""
        role = "system" if self.role == "developer" else self.role
        out: dict = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # extension (vLLM): -1 or 0 = off
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch.Generator accepts
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension (vLLM / HF)
    ignore_eos: bool = False  # extension: benchmarks want a fixed number of tokens
    logit_bias: dict[str, float] | None = None  # token id (as text) -> [-100, 100]
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # extension (vLLM): stop at these ids too
    calculator: bool = False  # extension: "<<expression=" is answered by the calculator (inference/calculator.py)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would match everywhere


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields):
    # A string, a batch of strings, a token-id list, or a batch of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # the OpenAI default for completions; 0 with echo scores the prompt
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt comes back before the completion (with its logprobs when logprobs is set)
    suffix: str | None = None


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's shape): a text prompt, or chat messages rendered as the chat endpoint does."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # messages only
    add_special_tokens: bool = False  # prompt only: prepend the document prefix (BOS; EOS for our tokenizers)
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def make_usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None  # each with its "index" in the reply's calls


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-framework"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- errors


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """First problem of a pydantic error as (message, param), e.g. ("messages.0.role: ...", "messages")."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "union[", "list["))]
    # Union members show up as type names in loc ("str", "list[...]"); keep only field names and indices.
    loc = [p for p in loc if p not in ("str", "int", "float", "bool", "TextPart")]
    where = ".".join(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "this server does not support this field; remove it (see the server's README section for what it accepts)"
    return (f"{where}: {msg}" if where else msg), (loc[0] if loc else None)


# ----------------------------------------------------------------------------- encoding


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


@functools.lru_cache(maxsize=1)
def _byte_of_symbol() -> dict[str, int]:
    from data_pipeline.tokenizer.bpe import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_piece(tok: Any, token_id: int) -> tuple[str, list[int]]:
    """(text, raw bytes) of one token. A byte-level BPE token may hold part of a UTF-8 character:
    its text is then U+FFFD but its bytes are exact (read through the GPT-2 byte alphabet)."""
    text = tok.decode([token_id], skip_special_tokens=False)
    symbol = tok.id_to_token(token_id) if token_id not in getattr(tok, "special_ids", ()) else None
    byte_of = _byte_of_symbol()
    if symbol and all(c in byte_of for c in symbol):
        return text, [byte_of[c] for c in symbol]
    return text, list(text.encode("utf-8"))


def token_logprobs(tok: Any, entries: Any) -> list[TokenLogprob]:
    """Engine TokenLogprob entries (token_id, logprob, top=[(id, logprob)]) -> OpenAI chat logprobs."""
    result = []
    for entry in entries or []:
        alts = []
        for token_id, logprob in entry.top:
            text, raw = token_piece(tok, token_id)
            alts.append(TopLogprob(token=text, logprob=float(logprob), bytes=raw))
        text, raw = token_piece(tok, entry.token_id)
        result.append(TokenLogprob(token=text, logprob=float(entry.logprob), bytes=raw, top_logprobs=alts))
    return result


def completion_logprobs(tok: Any, entries: list) -> CompletionLogprobs:
    """Engine TokenLogprob entries -> the legacy completions shape; an entry without a logprob
    (an echoed prompt's first token) has null for its logprob and its top_logprobs."""
    tokens, logprobs, tops, offsets, pos = [], [], [], [], 0
    for entry in entries or []:
        text = token_piece(tok, entry.token_id)[0]
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        if entry.logprob is None:
            logprobs.append(None)
            tops.append(None)
        else:
            logprobs.append(float(entry.logprob))
            tops.append({token_piece(tok, t)[0]: float(lp) for t, lp in entry.top})
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)
