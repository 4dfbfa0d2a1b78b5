"""AsyncEngine: the LLMEngine driven from asyncio, one background thread stepping it.

``LLMEngine.add_request`` / ``abort`` may be called from any thread (they are queued and
applied at the start of a step); ``step`` runs only on the engine thread. The thread sleeps
while the engine is idle and is woken by new work. Each step's outputs go to per-request
asyncio queues through ``loop.call_soon_threadsafe``; torch releases the GIL inside its
kernels, so the event loop keeps serving HTTP while a step runs.

    event loop:     submit() -> RequestStream (async iterator of RequestOutput); close() aborts
    engine thread:  step() -> outputs grouped by request -> that request's asyncio.Queue
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from utils.errors import UserError


class EngineOverloaded(Exception):
    """Too many requests in flight, or shutting down (the server answers 503)."""


class EngineDead(Exception):
    """The engine loop crashed on a bug; requests in flight fail (the server answers 500)."""


class RequestStream:
    """One submitted request: iterate to get its RequestOutputs until all ``n`` sequences end.

    Leaving the iteration early (client gone, task cancelled) or calling ``close()`` aborts the
    request in the engine, which frees its KV blocks.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, n: int):
        self.owner, self.request_id, self.n = owner, request_id, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished_indices: set[int] = set()
        self.done = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            while not self.done:
                item = await self.queue.get()
                if item is None:  # close() was called
                    return
                if isinstance(item, BaseException):
                    raise item
                if self.owner.observer is not None:
                    self.owner.observer.outputs(self, item)
                for out in item:
                    if out.finished:
                        # "error" ends all n sequences of a request with one output.
                        self.finished_indices.update(range(self.n) if out.finish_reason == "error" else [out.index])
                    yield out
                if len(self.finished_indices) >= self.n:
                    self.owner._streams.pop(self.request_id, None)
                    self.done = True
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request if it is still running; idempotent."""
        if self.owner._streams.pop(self.request_id, None) is not None and not self.done:
            self.owner.engine.abort(self.request_id)
            self.owner._wake.set()
        if not self.done:
            self.done = True
            self.queue.put_nowait(None)  # wake an iteration waiting on the queue


class AsyncEngine:
    """Runs ``engine`` (an LLMEngine) in a background thread. ``max_concurrent`` caps requests
    in flight (running + waiting); one more is refused with EngineOverloaded rather than
    queueing without bound."""

    def __init__(self, engine: Any, *, max_concurrent: int = 256):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = False
        self._closing = False
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.observer: Any = None  # e.g. inference.metrics.ServingMetrics: sees submissions and outputs

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.engine.driven_by = "an AsyncEngine's loop thread"
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids: list[int], params: Any, request_id: str | None = None, images: Any = None) -> RequestStream:
        """Queue a request and return its stream. Raises UserError for a request that is invalid
        or can never fit (so the server answers 400 before sending anything), EngineOverloaded
        when full or shutting down, EngineDead after an engine crash."""
        if self._error is not None:
            raise EngineDead(f"engine loop stopped: {self._error!r}")
        if self._closing:
            raise EngineOverloaded("the server is shutting down")
        if len(self._streams) >= self.max_concurrent:
            raise EngineOverloaded(f"{len(self._streams)} requests in flight (limit {self.max_concurrent})")
        why = self.engine.request_error(list(prompt_ids), params)
        if why:
            raise UserError(why)
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, params.n)
        self._streams[request_id] = stream
        try:
            self.engine.add_request(list(prompt_ids), params, request_id=request_id, images=images)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if self.observer is not None:  # outputs reach the stream on this loop, after this returns
            self.observer.submitted(stream, len(prompt_ids))
        self._wake.set()
        return stream

    async def drain(self, timeout: float) -> None:
        """Refuse new requests and let the ones in flight finish for up to ``timeout`` s; then
        end the rest with an error their clients see (streams close with an in-band error and
        [DONE], whole replies get a 503) instead of being cut off mid-stream."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(EngineDead("the server is shutting down; the request was stopped before it finished"))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let the ones in flight finish (up to ``timeout`` s), then stop."""
        await self.drain(timeout)
        await asyncio.sleep(0.1)  # let the streams deliver their closing error
        for stream in list(self._streams.values()):
            stream.close()
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            if not self._thread.is_alive():
                self.engine.driven_by = None

    def _deliver(self, stream: RequestStream, item: Any) -> None:
        """Called on the engine thread; the queue put runs on the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the loop is already closed (interpreter exit)
            pass

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while not self._stop:
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                else:
                    # wait -> clear -> re-check: a wake() between clear and the check is not lost,
                    # because has_unfinished() already sees the request queued before the wake.
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
        except BaseException as err:  # a bug in the engine: fail every request, keep serving errors
            self._error = err
            for stream in list(self._streams.values()):
                self._deliver(stream, EngineDead(repr(err)))
            raise

    def _dispatch(self, outputs: Iterable[Any]) -> None:
        by_request: dict[str, list] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        for request_id, outs in by_request.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                self._deliver(stream, outs)


# ----------------------------------------------------------------------------- choices


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None
    logprobs: Any  # engine's per-token logprob entries for the new tokens, or None
    prompt_logprobs: Any = None  # the prompt's entries (first has logprob None), once, when asked


class Generation:
    """Runs one engine request per prompt and yields text events per choice.

    Choice ``k * n + i`` is sample ``i`` of prompt ``k``. Text comes from the engine's
    incremental detokenizer (``new_text``: UTF-8 complete, stop strings cut and never
    half-sent, stop tokens not shown).
    """

    def __init__(self, streams: list[RequestStream], prompt_lens: list[int]):
        self.streams, self.prompt_lens = streams, prompt_lens
        self.n = streams[0].n
        self.num_choices = len(streams) * self.n
        self.completion_tokens = [0] * self.num_choices

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) so far, summed over prompts and choices."""
        return sum(self.prompt_lens), sum(self.completion_tokens)

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        try:
            async for k, out in self._merged():
                if out.finish_reason == "error":  # cannot happen after submit's check, unless the engine changes
                    raise UserError(out.error or "the engine could not run this request")
                key = k * self.n + out.index
                self.completion_tokens[key] = len(out.output_token_ids)
                reason = out.finish_reason if out.finished else None
                yield ChoiceEvent(key, out.new_text, reason, out.logprobs, out.prompt_logprobs)
        finally:
            self.close()

    async def _merged(self) -> AsyncIterator[tuple[int, Any]]:
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    await merged.put((k, out))
                await merged.put((k, None))
            except Exception as err:  # hand it to the consumer (cancellation just ends the pump)
                await merged.put((k, err))

        tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                k, item = await merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield k, item
        finally:
            for task in tasks:
                task.cancel()
