"""OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn).

    python inference/server.py --checkpoint runs/sft/step_00001000 --port 8000 [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming SSE or not),
GET /v1/models, GET /health, and a chat web page at /. Chat prompts are rendered only by
the project's chat template, so serving sees exactly the format the model was trained on.

Every bad request is answered in the OpenAI error shape with a 4xx status, never a 500:
400 invalid request, 401 missing/wrong API key, 404 unknown model or route, 413 body too
large, 503 overloaded or shutting down. A client that disconnects aborts its request so
the engine frees its KV blocks. On SIGTERM uvicorn stops accepting connections and lets
in-flight requests finish (``--shutdown-timeout``) before the engine thread stops.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference import api_protocol as P
from inference.async_engine import (
    AsyncEngine,
    EngineDead,
    EngineOverloaded,
    Generation,
    RequestStream,
)
from inference.sampling_params import SamplingParams
from utils.errors import UserError

WEB_DIR = Path(__file__).resolve().parent / "web"


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_tokens_cap: int = 4096
    n_cap: int = 8
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def chat_format() -> tuple[Any, Any]:
    """The project's one chat template (imported late: the server also serves plain completions)."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat

    return render_chat, chat_stop_ids


# ----------------------------------------------------------------------------- request plumbing


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
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
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
                    logprobs: bool, top_logprobs: int, max_tokens: int | None, prompt_param: str) -> SamplingParams:
    """Map an OpenAI request onto SamplingParams, enforcing the caps and the context length."""
    room = settings.max_model_len - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens but the context is {settings.max_model_len}; shorten it.", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(room, settings.max_tokens_cap)
    elif max_tokens > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens={max_tokens} is over this server's cap of {settings.max_tokens_cap}.", param="max_tokens")
    elif max_tokens > room:
        raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {settings.max_model_len} tokens; lower max_tokens.", param="max_tokens", code="context_length_exceeded")
    if req.n > settings.n_cap:
        raise ApiError(400, f"n={req.n} is over this server's cap of {settings.n_cap}.", param="n")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop_list(), stop_token_ids=list(stop_ids),
        n=req.n, logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=req.ignore_eos,
    )
    try:
        return params.validate(settings.max_model_len)
    except UserError as err:
        raise ApiError(400, str(err)) from None


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


# ----------------------------------------------------------------------------- responses


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


# ----------------------------------------------------------------------------- the app


def build_app(engine: AsyncEngine, tokenizer: Any, settings: ServerSettings, *, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app. ``engine`` is started and stopped by the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(shutdown_timeout)

    app = FastAPI(title="llm-framework", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # -- errors: every failure leaves in the OpenAI shape; only bugs are 500.
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=str(err.status_code)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {str(err)[:300]}").response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, err: UserError) -> JSONResponse:
        return ApiError(400, str(err)).response()

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, err: EngineOverloaded) -> JSONResponse:
        return ApiError(503, f"server overloaded: {err}; retry later.", "server_error", code="overloaded").response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        return ApiError(500, f"internal server error ({type(err).__name__}); this is a bug, please report it.", "server_error").response()

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r} (GET /v1/models).", param="model", code="model_not_found")

    def start(prompts: list[list[int]], params: SamplingParams) -> Generation:
        streams: list[RequestStream] = []
        try:
            for ids in prompts:
                streams.append(engine.submit(ids, params))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return Generation(streams, [len(ids) for ids in prompts])

    async def collect(gen: Generation) -> tuple[list[str], list[str | None], list[list]]:
        texts, reasons, logprobs = [""] * gen.num_choices, [None] * gen.num_choices, [[] for _ in range(gen.num_choices)]
        async for ev in gen.events():
            texts[ev.index] += ev.text
            logprobs[ev.index].extend(ev.logprobs or [])
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        return texts, reasons, logprobs

    # -- routes
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy
        return JSONResponse({"status": "ok" if ok else "engine stopped", "in_flight": engine.num_in_flight}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_auth(request, settings)
        card = P.ModelCard(id=settings.model_name, created=P.now(), max_model_len=settings.max_model_len)
        return P.ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        check_auth(request, settings)
        check_model(name)
        return P.ModelCard(id=name, created=P.now(), max_model_len=settings.max_model_len).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_auth(request, settings)
        req = parse(P.ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        render_chat, chat_stop_ids = chat_format()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
        except UserError as err:
            raise ApiError(400, str(err), param="messages") from None
        stop_ids = [] if req.ignore_eos else list(chat_stop_ids(tokenizer))
        params = sampling_params(req, len(prompt_ids), settings, stop_ids, req.logprobs, req.top_logprobs or 0,
                                 req.max_completion_tokens or req.max_tokens, "messages")
        gen = start([list(prompt_ids)], params)
        rid, created = P.new_id("chatcmpl"), P.now()

        def chunk(choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> str:
            return P.sse(P.ChatCompletionChunk(id=rid, created=created, model=settings.model_name, choices=choices, usage=usage))

        def lp(entries: list) -> P.ChoiceLogprobs | None:
            return P.ChoiceLogprobs(content=P.token_logprobs(tokenizer, entries)) if req.logprobs else None

        async def stream_body() -> AsyncIterator[str]:
            try:
                for i in range(gen.num_choices):
                    yield chunk([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))])
                async for ev in gen.events():
                    if ev.text or ev.finish_reason or (req.logprobs and ev.logprobs):
                        delta = P.Delta(content=ev.text) if ev.text else P.Delta()
                        yield chunk([P.ChatChunkChoice(index=ev.index, delta=delta, finish_reason=ev.finish_reason, logprobs=lp(ev.logprobs or []))])
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield chunk([], P.make_usage(*gen.usage()))
            except (EngineDead, UserError) as err:  # headers are sent: report in-band, as OpenAI does
                yield P.sse(P.error_body(str(err), "server_error" if isinstance(err, EngineDead) else "invalid_request_error"))
            yield "data: [DONE]\n\n"

        if req.stream:
            return GenerationResponse(stream_body(), gen)
        try:
            texts, reasons, logprobs = await until_disconnect(request, collect(gen))
        finally:
            gen.close()
        choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=t), finish_reason=r, logprobs=lp(logprobs[i]))
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return P.ChatCompletion(id=rid, created=created, model=settings.model_name, choices=choices, usage=P.make_usage(*gen.usage())).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_auth(request, settings)
        req = parse(P.CompletionRequest, await read_json(request, settings.max_body_bytes))
        check_model(req.model)
        if req.echo or req.suffix:
            raise ApiError(400, "echo and suffix are not supported by this server.", param="echo" if req.echo else "suffix")
        prompts = encode_prompts(req.prompt, tokenizer)
        if len(prompts) > engine.max_concurrent:
            raise ApiError(400, f"{len(prompts)} prompts in one request; the limit is {engine.max_concurrent}.", param="prompt")
        params = sampling_params(req, max(map(len, prompts)), settings, [], req.logprobs is not None, req.logprobs or 0, req.max_tokens, "prompt")
        gen = start(prompts, params)
        rid, created = P.new_id("cmpl"), P.now()

        def lp(entries: list) -> P.CompletionLogprobs | None:
            return P.completion_logprobs(tokenizer, entries) if req.logprobs is not None else None

        async def stream_body() -> AsyncIterator[str]:
            try:
                async for ev in gen.events():
                    if ev.text or ev.finish_reason or (req.logprobs is not None and ev.logprobs):
                        choice = P.CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason, logprobs=lp(ev.logprobs or []))
                        yield P.sse(P.Completion(id=rid, created=created, model=settings.model_name, choices=[choice]))
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield P.sse(P.Completion(id=rid, created=created, model=settings.model_name, choices=[], usage=P.make_usage(*gen.usage())))
            except (EngineDead, UserError) as err:  # headers are sent: report in-band, as OpenAI does
                yield P.sse(P.error_body(str(err), "server_error" if isinstance(err, EngineDead) else "invalid_request_error"))
            yield "data: [DONE]\n\n"

        if req.stream:
            return GenerationResponse(stream_body(), gen)
        try:
            texts, reasons, logprobs = await until_disconnect(request, collect(gen))
        finally:
            gen.close()
        choices = [P.CompletionChoice(index=i, text=t, finish_reason=r, logprobs=lp(logprobs[i])) for i, (t, r) in enumerate(zip(texts, reasons))]
        return P.Completion(id=rid, created=created, model=settings.model_name, choices=choices, usage=P.make_usage(*gen.usage())).model_dump()

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


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
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else None
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ApiError(400, "prompt is empty; send at least one token of text.", param="prompt")
    if vocab is not None and any(not 0 <= t < vocab for p in prompts for t in p):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt")
    return [list(map(int, p)) for p in prompts]


# ----------------------------------------------------------------------------- entry point


def load_serving(args: argparse.Namespace) -> tuple[Any, Any]:
    """(engine, tokenizer) for a checkpoint directory; shared by the server and the chat CLI."""
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {str(ckpt)!r} does not exist; point --checkpoint at a directory written by a training stage.")
    tok_path = Path(args.tokenizer) if args.tokenizer else ckpt / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"no tokenizer at {tok_path}; checkpoints carry tokenizer.json beside the weights, or pass --tokenizer PATH.")
    import torch  # after the checks: a typo in a path should not wait for torch to load

    from inference.engine import LLMEngine, load_tokenizer

    tokenizer = load_tokenizer(tok_path)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    engine = LLMEngine.from_checkpoint(str(ckpt), tokenizer=tokenizer, device=device, dtype=dtype,
                                       max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    return engine, tokenizer


def add_engine_args(parser: argparse.ArgumentParser, max_num_seqs: int = 32) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors, model_config.json, tokenizer.json)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in the checkpoint)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-num-seqs", type=int, default=max_num_seqs, help="sequences decoded together per step")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's max_seq_len)")


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """``--config_path serve.yaml``: a YAML whose keys are the flags' names (``max_num_seqs`` or
    ``max-num-seqs``) becomes the parser's defaults; flags on the command line still win.
    Unknown keys and wrong types are reported together, with the closest flag."""
    import difflib
    import sys

    from utils.config import read_yaml

    parser.add_argument("--config_path", default=None, help="YAML of flag values (e.g. configs/.../5_serve.yaml)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_path", default=None)
    path = pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].config_path
    if path is None:
        return
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config_path")}
    values, problems = {}, []
    for key, value in read_yaml(path).items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            match = difflib.get_close_matches(dest, list(actions), n=1)
            problems.append(f"{path}: {key}: unknown key{f' (did you mean {match[0]!r}?)' if match else ''}")
            continue
        kind = actions[dest].type
        if kind in (int, float) and not (isinstance(value, (int, float)) and not isinstance(value, bool)) and value is not None:
            problems.append(f"{path}: {key}: expected {kind.__name__}, got {value!r}")
            continue
        choices = actions[dest].choices
        if choices and value not in choices:
            problems.append(f"{path}: {key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
            continue
        values[dest] = value
        actions[dest].required = False
    if problems:
        raise UserError(f"invalid serve recipe ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    parser.set_defaults(**values)


def build_parser() -> argparse.ArgumentParser:
    import os

    parser = argparse.ArgumentParser(description="OpenAI-compatible server for a checkpoint.")
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LLM_API_KEY"), help="require 'Authorization: Bearer KEY' on /v1 (default: $LLM_API_KEY)")
    parser.add_argument("--model-name", default=None, help="name clients pass as 'model' (default: the checkpoint directory's name)")
    parser.add_argument("--max-concurrent", type=int, default=256, help="requests in flight before answering 503")
    parser.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask for")
    parser.add_argument("--n-cap", type=int, default=8, help="largest n (choices per request)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM")
    parser.add_argument("--log-level", default="info")
    return parser


def parse_serve_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_serve_args(argv)
    for flag in ("port", "max_concurrent", "max_tokens_cap", "n_cap", "max_body_bytes", "max_num_seqs"):
        if getattr(args, flag) < 1 and not (flag == "port" and getattr(args, flag) == 0):
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")

    engine, tokenizer = load_serving(args)
    settings = ServerSettings(
        model_name=args.model_name or Path(args.checkpoint).resolve().name, max_model_len=engine.max_model_len,
        api_key=args.api_key or None, max_tokens_cap=args.max_tokens_cap, n_cap=args.n_cap, max_body_bytes=args.max_body_bytes,
    )
    app = build_app(AsyncEngine(engine, max_concurrent=args.max_concurrent), tokenizer, settings, shutdown_timeout=args.shutdown_timeout)
    print(f"serving {settings.model_name!r} ({engine.max_model_len}-token context, {engine.num_blocks} KV blocks) "
          f"on http://{args.host}:{args.port}  (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout)


if __name__ == "__main__":
    from utils.cli import main_guard

    main_guard(main)
