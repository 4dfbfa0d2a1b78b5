"""OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn).

    python inference/server.py --checkpoint runs/sft/final --port 8000 [--api-key KEY]
    python inference/server.py --config_path configs/.../5_serve.yaml [--port 9000 ...]

Settings are a typed recipe (inference/serve_recipe.py): every key is a flag and a YAML key.
The checkpoint may be a full model or a LoRA/QLoRA adapter (merged onto its base on load,
through model/load.py, exactly as eval loads it).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming SSE or not),
GET /v1/models, GET /health, POST /tokenize, POST /detokenize, GET /tokenizer_info
(inference/server_tokenize.py), and a chat web page at /. Chat prompts are rendered only by
the project's chat template, so serving sees exactly the format the model was trained on.

/v1/completions is also an evaluation backend (lm-evaluation-harness's ``local-completions``):
``echo`` with ``logprobs`` returns the prompt's token log-probabilities (computed in the
prefill, inference/prompt_scoring.py), ``max_tokens: 0`` scores without generating, and a
prompt that ends with the chat format's assistant header stops at its end-of-turn token
(``stop_token_ids`` adds more, as in vLLM).

Every bad request is answered in the OpenAI error shape with a 4xx status, never a 500:
400 invalid request, 401 missing/wrong API key, 404 unknown model or route, 413 body too
large, 503 overloaded or shutting down. A client that disconnects aborts its request so
the engine frees its KV blocks. On SIGTERM uvicorn stops accepting connections and lets
in-flight requests finish (``shutdown_timeout``) before the engine thread stops.
"""
from __future__ import annotations

import asyncio
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference import api_protocol as P
from inference import server_tokenize
from inference.async_engine import AsyncEngine, ChoiceEvent, EngineDead, EngineOverloaded, Generation, RequestStream
from inference.metrics import ServingMetrics
from inference.server_http import (  # noqa: F401  (ServerSettings and encode_prompts are part of this module's API)
    ApiError,
    GenerationResponse,
    ServerSettings,
    check_auth,
    check_token_ids,
    echo_texts,
    encode_prompts,
    longest_token_chars,
    text_chars,
    parse,
    read_json,
    sampling_params,
    until_disconnect,
)
from inference.sampling_params import SamplingParams
from inference.serve_recipe import ServeRecipe, load_serving, parse_serving_args
from utils.errors import UserError

WEB_DIR = Path(__file__).resolve().parent / "web"


def chat_format() -> tuple[Any, Any]:
    """The project's one chat template (imported late: the server also serves plain completions)."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat

    return render_chat, chat_stop_ids


# ----------------------------------------------------------------------------- what every route needs


@dataclass
class Server:
    """The state the routes share: the engine, the tokenizer and the settings they enforce."""

    engine: AsyncEngine
    tokenizer: Any
    settings: ServerSettings

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.settings.model_name!r} "
                                "(GET /v1/models).", param="model", code="model_not_found")

    def start(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], images=None) -> Generation:
        """Submit one engine request per prompt (``params`` one for all, or one per prompt; ``images``
        the pixels of a single chat prompt's images); on failure none is left running."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        streams: list[RequestStream] = []
        try:
            for ids, p in zip(prompts, per_prompt, strict=True):
                streams.append(self.engine.submit(ids, p, images=images))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return Generation(streams, [len(ids) for ids in prompts])

    @functools.cached_property
    def reply_header(self) -> list[int]:
        """The chat format's assistant header (what add_generation_prompt appends), [] if none."""
        from data_pipeline.tokenizer.chat_template import generation_prompt_ids

        return generation_prompt_ids(self.tokenizer)

    @functools.cached_property
    def prompt_char_limit(self) -> int | None:
        """Characters past which a prompt cannot fit the context, whatever it tokenizes to: a token
        stands for at most the vocabulary's longest entry (doubled, for normalizers that drop
        characters). Checked before tokenizing, so a 1 MB prompt for a small model costs nothing."""
        longest = longest_token_chars(self.tokenizer)
        return None if longest is None else 2 * self.settings.max_model_len * longest

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        limit = self.prompt_char_limit
        if limit is not None and n_chars > limit:
            raise ApiError(400, f"the prompt is {n_chars} characters; the {self.settings.max_model_len}-token context cannot "
                                f"hold more than {limit} with this tokenizer; shorten it.", param=param, code="context_length_exceeded")

    def completion_stop_ids(self, req: P.CompletionRequest, prompt: list[int]) -> list[int]:
        """Stop ids of one /v1/completions prompt: the request's ``stop_token_ids``, plus the chat
        format's end-of-turn ids when the prompt ends with an assistant header (a chat rendered
        by the client; the reply then ends at its end-of-turn token, as on the chat endpoint).
        ``ignore_eos`` drops that default, never the ids the request names."""
        stops = check_token_ids(req.stop_token_ids or [], self.tokenizer, "stop_token_ids")
        header = self.reply_header
        if not req.ignore_eos and header and prompt[-len(header) :] == header:
            _, chat_stop_ids = chat_format()
            stops += [t for t in chat_stop_ids(self.tokenizer) if t not in stops]
        return stops


def server_of(request: Request) -> Server:
    return request.app.state.server


class EchoedGeneration:
    """A completion Generation whose choices start with their prompt (``echo``): the first event of
    each choice carries the prompt text and, when asked, the prompt's logprob entries (the first
    token's logprob null), so streamed and whole replies share one path."""

    def __init__(self, gen: Generation, prompt_texts: list[str], with_logprobs: bool):
        self.gen, self.prompt_texts, self.with_logprobs = gen, prompt_texts, with_logprobs
        self.num_choices = gen.num_choices

    def usage(self) -> tuple[int, int]:
        return self.gen.usage()

    def close(self) -> None:
        self.gen.close()

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        echoed: set[int] = set()
        async for ev in self.gen.events():
            if ev.index not in echoed:
                echoed.add(ev.index)
                k = ev.index // self.gen.n  # choice k * n + i is sample i of prompt k
                prompt_lps = ev.prompt_logprobs if self.with_logprobs else None
                ev = ChoiceEvent(ev.index, self.prompt_texts[k] + ev.text, ev.finish_reason,
                                 (prompt_lps or []) + (ev.logprobs or []) if self.with_logprobs else ev.logprobs)
            yield ev


# ----------------------------------------------------------------------------- one reply, streamed or whole


async def collect(gen: Generation) -> tuple[list[str], list[str | None], list[list]]:
    """Every choice's text, finish reason and logprob entries, once generation is done."""
    texts, reasons, logprobs = [""] * gen.num_choices, [None] * gen.num_choices, [[] for _ in range(gen.num_choices)]
    async for ev in gen.events():
        texts[ev.index] += ev.text
        logprobs[ev.index].extend(ev.logprobs or [])
        reasons[ev.index] = ev.finish_reason or reasons[ev.index]
    return texts, reasons, logprobs


async def sse_events(gen: Generation, opening: list[str], event_chunk: Callable[[ChoiceEvent], Optional[str]],
                     usage_chunk: Optional[Callable[[P.Usage], str]]) -> AsyncIterator[str]:
    """The SSE body both endpoints stream: ``opening`` chunks, one chunk per event that has
    something to say, the usage chunk when asked for, then ``[DONE]``. An error after the
    headers went out is reported in-band, as OpenAI does."""
    try:
        for chunk in opening:
            yield chunk
        async for ev in gen.events():
            chunk = event_chunk(ev)
            if chunk is not None:
                yield chunk
        if usage_chunk is not None:
            yield usage_chunk(P.make_usage(*gen.usage()))
    except (EngineDead, UserError) as err:
        yield P.sse(P.error_body(str(err), "server_error" if isinstance(err, EngineDead) else "invalid_request_error"))
    yield "data: [DONE]\n\n"


async def respond(request: Request, gen: Generation, stream: bool, body: Callable[[], AsyncIterator[str]],
                  whole: Callable[[list[str], list, list[list], P.Usage], dict]) -> Any:
    """Stream ``body()`` (the engine requests are released whatever the client does), or wait
    for every choice (aborting if the client hangs up) and answer ``whole(...)``."""
    if stream:
        return GenerationResponse(body(), gen)
    try:
        texts, reasons, logprobs = await until_disconnect(request, collect(gen))
    finally:
        gen.close()
    return whole(texts, reasons, logprobs, P.make_usage(*gen.usage()))


# ----------------------------------------------------------------------------- routes


async def health(request: Request) -> JSONResponse:
    engine = server_of(request).engine
    ok = engine.healthy
    body = {"status": "ok" if ok else "engine stopped", "in_flight": engine.num_in_flight}
    rate = getattr(engine.engine, "acceptance_rate", None)
    if rate is not None:
        body["speculative_acceptance_rate"] = round(rate, 4)
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """Prometheus exposition (inference/metrics.py); like /health, open without the API key."""
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


async def list_models(request: Request) -> dict:
    srv = server_of(request)
    check_auth(request, srv.settings)
    card = P.ModelCard(id=srv.settings.model_name, created=P.now(), max_model_len=srv.settings.max_model_len)
    return P.ModelList(data=[card]).model_dump()


async def get_model(name: str, request: Request) -> dict:
    srv = server_of(request)
    check_auth(request, srv.settings)
    srv.check_model(name)
    return P.ModelCard(id=name, created=P.now(), max_model_len=srv.settings.max_model_len).model_dump()


def chat_setup(req: P.ChatCompletionRequest, tok: Any) -> tuple[list[dict], list | None, dict | None]:
    """(messages for the template, tools to offer, grammar) of a chat request: function calling and
    structured output mapped onto the tokenizer's chat format and constrained decoding."""
    from inference.grammar import schema_of
    from inference.tool_calls import check_tools, for_template, forced_call_grammar

    messages = [m.as_dict() for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, P.NamedToolChoice) else req.tool_choice
    if choice not in (None, "none", "auto") and not tools:
        raise ApiError(400, "tool_choice needs tools to choose from.", param="tool_choice")
    grammar = None
    fmt = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    if fmt and fmt["type"] != "text":
        try:
            grammar = schema_of(fmt)
        except UserError as err:
            raise ApiError(400, str(err), param="response_format") from None
    if tools:
        try:
            forced = check_tools(tools, choice)
        except UserError as err:
            raise ApiError(400, str(err), param="tools") from None
        if choice == "none":
            tools = None
        elif choice == "required" or forced is not None:
            if grammar is not None:
                raise ApiError(400, "response_format and a required tool call cannot both constrain the reply.", param="response_format")
            grammar = forced_call_grammar(tools, forced)
    return for_template(messages), tools, grammar


async def chat_completions(request: Request) -> Any:
    from inference.tool_calls import CallSplitter, parse_tool_calls

    srv = server_of(request)
    check_auth(request, srv.settings)
    req = parse(P.ChatCompletionRequest, await read_json(request, srv.settings.max_body_bytes))
    srv.check_model(req.model)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
    from inference.server_images import chat_prompt

    _, chat_stop_ids = chat_format()
    tok, name = srv.tokenizer, srv.settings.model_name
    messages, tools, grammar = chat_setup(req, tok)
    srv.check_prompt_chars(text_chars(messages) + text_chars(tools), "messages")  # images are counted as markers
    try:  # off the event loop: rendering and tokenizing a long chat, decoding images, take a while
        prompt_ids, pixels = await asyncio.to_thread(chat_prompt, srv, req, messages, tools)
    except UserError as err:
        raise ApiError(400, str(err), param="messages") from None
    stop_ids = ([] if req.ignore_eos else list(chat_stop_ids(tok))) + check_token_ids(req.stop_token_ids or [], tok, "stop_token_ids")
    params = sampling_params(req, len(prompt_ids), srv.settings, stop_ids, req.logprobs, req.top_logprobs or 0,
                             req.max_completion_tokens or req.max_tokens, "messages", grammar)
    gen = srv.start([list(prompt_ids)], params, images=pixels)
    rid, created = P.new_id("chatcmpl"), P.now()
    splitters = [CallSplitter() for _ in range(gen.num_choices)] if tools else None

    def chunk(choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> str:
        return P.sse(P.ChatCompletionChunk(id=rid, created=created, model=name, choices=choices, usage=usage))

    def lp(entries: list) -> P.ChoiceLogprobs | None:
        return P.ChoiceLogprobs(content=P.token_logprobs(tok, entries)) if req.logprobs else None

    def event_chunk(ev: ChoiceEvent) -> Optional[str]:
        text, calls, reason = ev.text, [], ev.finish_reason
        if splitters is not None:  # hold back what may be a tool call until the reply is complete
            text = splitters[ev.index].feed(ev.text)
            if ev.finish_reason is not None:
                rest, calls = splitters[ev.index].finish()
                text += rest
                reason = "tool_calls" if calls else reason
        if not (text or calls or reason or (req.logprobs and ev.logprobs)):
            return None
        delta = P.Delta(content=text or None, tool_calls=[{"index": i, **c} for i, c in enumerate(calls)] or None)
        return chunk([P.ChatChunkChoice(index=ev.index, delta=delta, finish_reason=reason, logprobs=lp(ev.logprobs or []))])

    def body() -> AsyncIterator[str]:
        opening = [chunk([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))]) for i in range(gen.num_choices)]
        usage = (lambda u: chunk([], u)) if req.stream_options is not None and req.stream_options.include_usage else None
        return sse_events(gen, opening, event_chunk, usage)

    def message(text: str, reason: str | None) -> tuple[P.AssistantMessage, str | None]:
        content, calls = parse_tool_calls(text) if tools else (text, [])
        return P.AssistantMessage(content=content, tool_calls=calls or None), ("tool_calls" if calls else reason)

    def whole(texts: list[str], reasons: list, logprobs: list[list], usage: P.Usage) -> dict:
        choices = []
        for i, (t, r) in enumerate(zip(texts, reasons)):
            msg, reason = message(t, r)
            choices.append(P.ChatChoice(index=i, message=msg, finish_reason=reason, logprobs=lp(logprobs[i])))
        return P.ChatCompletion(id=rid, created=created, model=name, choices=choices, usage=usage).model_dump()

    return await respond(request, gen, req.stream, body, whole)


async def completions(request: Request) -> Any:
    srv = server_of(request)
    check_auth(request, srv.settings)
    req = parse(P.CompletionRequest, await read_json(request, srv.settings.max_body_bytes))
    srv.check_model(req.model)
    if req.suffix:
        raise ApiError(400, "suffix is not supported by this server.", param="suffix")
    tok, name = srv.tokenizer, srv.settings.model_name
    srv.check_prompt_chars(text_chars(req.prompt), "prompt")
    prompts = await asyncio.to_thread(encode_prompts, req.prompt, tok)
    if len(prompts) > srv.engine.max_concurrent:
        raise ApiError(400, f"{len(prompts)} prompts in one request; the limit is {srv.engine.max_concurrent}.", param="prompt")
    # echo + logprobs scores the prompt too (likelihood evaluation: lm-eval's loglikelihood requests)
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = [sampling_params(req, len(ids), srv.settings, srv.completion_stop_ids(req, ids), req.logprobs is not None,
                              req.logprobs or 0, req.max_tokens, "prompt", prompt_logprobs=prompt_logprobs) for ids in prompts]
    gen = srv.start(prompts, params)
    if req.echo:
        gen = EchoedGeneration(gen, echo_texts(req.prompt, prompts, tok), req.logprobs is not None)
    rid, created = P.new_id("cmpl"), P.now()

    def lp(entries: list) -> P.CompletionLogprobs | None:
        return P.completion_logprobs(tok, entries) if req.logprobs is not None else None

    def event_chunk(ev: ChoiceEvent) -> Optional[str]:
        if not (ev.text or ev.finish_reason or (req.logprobs is not None and ev.logprobs)):
            return None
        choice = P.CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason, logprobs=lp(ev.logprobs or []))
        return P.sse(P.Completion(id=rid, created=created, model=name, choices=[choice]))

    def body() -> AsyncIterator[str]:
        usage = ((lambda u: P.sse(P.Completion(id=rid, created=created, model=name, choices=[], usage=u)))
                 if req.stream_options is not None and req.stream_options.include_usage else None)
        return sse_events(gen, [], event_chunk, usage)

    def whole(texts: list[str], reasons: list, logprobs: list[list], usage: P.Usage) -> dict:
        choices = [P.CompletionChoice(index=i, text=t, finish_reason=r, logprobs=lp(logprobs[i]))
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return P.Completion(id=rid, created=created, model=name, choices=choices, usage=usage).model_dump()

    return await respond(request, gen, req.stream, body, whole)


async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html")


# ----------------------------------------------------------------------------- the app


def add_error_handlers(app: FastAPI) -> None:
    """Every failure leaves in the OpenAI shape; only bugs are 500."""

    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=str(err.status_code)).response()

    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {str(err)[:300]}").response()

    async def user_error(request: Request, err: UserError) -> JSONResponse:
        return ApiError(400, str(err)).response()

    async def overloaded(request: Request, err: EngineOverloaded) -> JSONResponse:
        return ApiError(503, f"server overloaded: {err}; retry later.", "server_error", code="overloaded").response()

    async def engine_stopped(request: Request, err: EngineDead) -> JSONResponse:
        return ApiError(503, f"{err}; retry later.", "server_error", code="unavailable").response()

    async def bug(request: Request, err: Exception) -> JSONResponse:
        return ApiError(500, f"internal server error ({type(err).__name__}); this is a bug, please report it.", "server_error").response()

    for kind, handler in ((ApiError, api_error), (StarletteHTTPException, http_error), (RequestValidationError, validation_error),
                          (UserError, user_error), (EngineOverloaded, overloaded), (EngineDead, engine_stopped),
                          (Exception, bug)):
        app.add_exception_handler(kind, handler)


def build_app(engine: AsyncEngine, tokenizer: Any, settings: ServerSettings, *, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app. ``engine`` is started and stopped by the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(shutdown_timeout)

    app = FastAPI(title="llm-framework", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(engine, tokenizer, settings)
    app.state.metrics = engine.observer = ServingMetrics(engine.engine)
    add_error_handlers(app)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/tokenize", server_tokenize.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server_tokenize.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", server_tokenize.tokenizer_info, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"])
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


# ----------------------------------------------------------------------------- entry point


def parse_serve_args(argv: Optional[Sequence[str]] = None) -> ServeRecipe:
    return parse_serving_args(ServeRecipe, "OpenAI-compatible server for a checkpoint. Every key of the serve recipe "
                                           "is a flag (--max-num-seqs 8) and a YAML key (--config_path serve.yaml).", argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    recipe = parse_serve_args(argv)
    engine, tokenizer = load_serving(recipe)
    settings = ServerSettings(
        model_name=recipe.model_name or Path(recipe.checkpoint).resolve().name, max_model_len=engine.max_model_len,
        api_key=recipe.api_key, max_tokens_cap=recipe.max_tokens_cap, n_cap=recipe.n_cap, max_body_bytes=recipe.max_body_bytes,
        clamp_max_tokens=recipe.clamp_max_tokens,
    )
    async_engine = AsyncEngine(engine, max_concurrent=recipe.max_concurrent)
    app = build_app(async_engine, tokenizer, settings, shutdown_timeout=recipe.shutdown_timeout)
    spec = f", speculative decoding: {recipe.draft_checkpoint} drafts {engine.k} tokens" if engine.draft_model else ""
    print(f"serving {settings.model_name!r} ({engine.max_model_len}-token context, {engine.num_blocks} KV blocks{spec}) "
          f"on http://{recipe.host}:{recipe.port}  (chat page at /, API at /v1)", flush=True)
    config = uvicorn.Config(app, host=recipe.host, port=recipe.port, log_level=recipe.log_level,
                            timeout_graceful_shutdown=recipe.shutdown_timeout + 5)
    DrainingServer(config, async_engine, recipe.shutdown_timeout).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/Ctrl-C starting the engine's drain at once: requests in flight
    get ``shutdown_timeout`` s to finish, then end with an in-band error and [DONE], before uvicorn's
    own grace period (5 s longer) would cut their connections."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, timeout

    def handle_exit(self, sig: int, frame: Any) -> None:  # uvicorn's signal hook
        if not self.should_exit:
            asyncio.get_event_loop().create_task(self.engine.drain(self.drain_timeout))
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    from utils.cli import main_guard

    main_guard(main)
