"""HTTP plumbing of the OpenAI-compatible server: errors in the OpenAI shape, auth, bounded
body reading, request validation, the sampling caps, and cancelling work when a client hangs up.

Everything here is about one HTTP request; what the routes do with it is in server.py.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ValidationError

from inference import api_protocol as P
from inference.async_engine import Generation
from inference.sampling_params import SamplingParams
from utils.errors import UserError

MAX_STOP = 4  # stop strings per request, as the OpenAI API allows
log = logging.getLogger("inference.server")


@dataclass
class ServerSettings:
    """What the routes enforce (from the ServeRecipe and the loaded engine)."""

    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_tokens_cap: int = 4096
    n_cap: int = 8
    max_body_bytes: int = 1 << 20
    clamp_max_tokens: bool = False  # lower a max_tokens past the context to what fits (and log it) instead of 400


class ApiError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def check_auth(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    # compare_digest: the time taken does not reveal how many leading characters matched.
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'.", "authentication_error", code="invalid_api_key")


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object; 413 past ``max_bytes`` (checked while reading, so a
    lying or absent Content-Length cannot make the server buffer more)."""
    too_big = ApiError(413, f"request body is larger than {max_bytes} bytes; send a shorter prompt.", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: one line in the log, no traceback
        log.info("%s %s: the client disconnected while sending the body (%d bytes read)", request.method,
                 request.url.path, size)
        raise ApiError(400, "the client disconnected before the request body was complete.", code="client_disconnected") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
        raise ApiError(400, f"request body is not valid JSON ({str(err)[:120]}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object.", code="invalid_json")
    return body


def parse(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        message, param = P.describe_validation_error(err)
        raise ApiError(400, message, param=param, code="invalid_value") from None


def sampling_params(req: P._SamplingFields, prompt_len: int, settings: ServerSettings, stop_ids: list[int],
                    logprobs: bool, top_logprobs: int, max_tokens: int | None, prompt_param: str,
                    grammar: dict | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """Map an OpenAI request onto SamplingParams, enforcing the caps and the context length
    (``max_tokens=0``, scoring the prompt only, lets the prompt fill the context)."""
    room = settings.max_model_len - prompt_len
    if room < (0 if max_tokens == 0 else 1):
        raise ApiError(400, f"the prompt is {prompt_len} tokens but the context is {settings.max_model_len}; shorten it.", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(room, settings.max_tokens_cap)
    elif max_tokens > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens={max_tokens} is over this server's cap of {settings.max_tokens_cap}.", param="max_tokens")
    elif max_tokens > room and settings.clamp_max_tokens:
        log.warning("max_tokens %d lowered to %d: the prompt (%d tokens) leaves that much of the %d-token context",
                    max_tokens, room, prompt_len, settings.max_model_len)
        max_tokens = room
    elif max_tokens > room:
        raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {settings.max_model_len} tokens; "
                            "lower max_tokens (lm-eval: --model_args max_gen_toks=N), or start the server with --clamp-max-tokens "
                            "to have it lowered to what fits.", param="max_tokens", code="context_length_exceeded")
    if req.n > settings.n_cap:
        raise ApiError(400, f"n={req.n} is over this server's cap of {settings.n_cap}.", param="n")
    if len(req.stop_list()) > MAX_STOP:
        raise ApiError(400, f"stop holds {len(req.stop_list())} strings; at most {MAX_STOP} (as the OpenAI API).", param="stop")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop_list(), stop_token_ids=list(stop_ids),
        n=req.n, logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=req.ignore_eos, prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias(req.logit_bias), grammar=grammar, calculator=req.calculator,
    )
    try:
        return params.validate(settings.max_model_len)
    except UserError as err:
        raise ApiError(400, str(err)) from None


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias ({"token id": bias}) with integer keys; a key that is not a token id is a 400."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"logit_bias keys are token ids, got {key!r}.", param="logit_bias")
        out[int(key)] = value
    return out


async def until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work``; if the client hangs up first, cancel it (which aborts its engine requests)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the work's finally blocks abort its engine requests
            await asyncio.wait({task})
    if task.cancelled():
        raise ApiError(499, "client closed the request", code="client_closed")  # nobody reads this answer
    return task.result()


class GenerationResponse(StreamingResponse):
    """A streaming response that always releases its engine requests, even when the client
    disconnects before the body iterator starts (its ``finally`` would then never run)."""

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def encode_prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """/v1/completions prompt (str | list[str] | list[int] | list[list[int]]) -> token-id lists."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ApiError(400, "prompt is empty; send at least one token of text.", param="prompt")
    return [check_token_ids(p, tokenizer, "prompt") for p in prompts]


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token stands for (the vocabulary's longest entry; byte-level
    entries are one character per byte); None for a tokenizer that cannot list its vocabulary."""
    if not hasattr(tokenizer, "id_to_token"):
        return None
    return max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)) or 1


def text_chars(value: Any) -> int:
    """The characters of every string in a JSON value (a prompt, messages, tools)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value)
    return 0


def check_token_ids(ids: list[int], tokenizer: Any, param: str) -> list[int]:
    """Token ids from a request, each in the tokenizer's vocabulary (else 400 naming ``param``)."""
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else None
    if vocab is not None and any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"{param} token ids must be in [0, {vocab}).", param=param)
    return [int(t) for t in ids]


def echo_texts(prompt: Any, prompts: list[list[int]], tokenizer: Any) -> list[str]:
    """The text each /v1/completions prompt echoes: as sent, or decoded when sent as token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], str):
        return list(prompt)
    return [tokenizer.decode(p) for p in prompts]
