"""AsyncEngine: the synchronous LLMEngine driven from asyncio, plus streaming text.

The engine is not thread-safe, so exactly one background thread owns it: it adds and
aborts requests from a command queue, calls ``engine.step()`` while work remains and
hands each step's outputs to the asyncio side through per-request queues
(``loop.call_soon_threadsafe``). Torch releases the GIL inside its kernels, so the event
loop keeps serving HTTP while a step runs.

    engine thread:  [drain commands] -> step() -> outputs -> per-request asyncio.Queue
    event loop:     submit() -> RequestStream (async iterator of RequestOutput) -> abort on close

``TextStream`` turns a growing list of token ids into text deltas (holding back incomplete
UTF-8 and possible stop-string prefixes); the server and the chat CLI both use it.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import Any, AsyncIterator, Iterable, Optional

from utils.errors import UserError


class EngineOverloaded(Exception):
    """Too many requests in flight (the server answers 503)."""


class EngineDead(Exception):
    """The engine loop crashed on a bug; requests in flight fail (the server answers 500)."""


class RequestStream:
    """One submitted request: iterate to get its RequestOutputs until all ``n`` choices finish.

    Leaving the iteration early (client gone, task cancelled, ``close()``) aborts the request
    in the engine so its KV blocks are freed.
    """

    def __init__(self, owner: "AsyncEngine", request_id: str, n: int):
        self.owner, self.request_id, self.n = owner, request_id, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()
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
                for out in item:
                    if out.finished:
                        self.finished_indices.add(out.index)
                    yield out
                if len(self.finished_indices) >= self.n:
                    self.done = True
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request if it is still running; idempotent."""
        if self.owner._streams.pop(self.request_id, None) is not None and not self.done:
            self.owner._post(("abort", self.request_id))
        if not self.done:
            self.done = True
            self.queue.put_nowait(None)  # wake an iteration waiting on the queue


class AsyncEngine:
    """Runs ``engine`` in a background thread. ``max_concurrent`` caps requests in flight
    (running + waiting); one more is refused with EngineOverloaded instead of queueing forever."""

    def __init__(self, engine: Any, *, max_concurrent: int = 256):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._closing = False
        self._error: Optional[BaseException] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    async def submit(self, prompt_ids: list[int], params: Any, request_id: Optional[str] = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it (so a bad request raises here
        as UserError, before any response is sent). Raises EngineOverloaded when full."""
        if self._error is not None:
            raise EngineDead(f"engine loop stopped: {self._error!r}")
        if self._closing:
            raise EngineOverloaded("the server is shutting down")
        if len(self._streams) >= self.max_concurrent:
            raise EngineOverloaded(f"{len(self._streams)} requests in flight (limit {self.max_concurrent})")
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, getattr(params, "n", 1))
        self._streams[request_id] = stream
        self._post(("add", request_id, list(prompt_ids), params))
        try:
            await stream.accepted
        except BaseException:
            stream.close()  # also covers cancellation while waiting: abort what may have been added
            raise
        return stream

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let the ones in flight finish (up to ``timeout`` s), then stop."""
        self._closing = True
        deadline = asyncio.get_running_loop().time() + timeout
        while self._streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(self._streams.values()):
            stream.close()
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, stream: RequestStream, item: Any) -> None:
        """Called on the engine thread; runs the queue put on the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # loop already closed at interpreter exit
            pass

    def _resolve(self, stream: RequestStream, error: Optional[BaseException]) -> None:
        def settle() -> None:
            if not stream.accepted.done():
                stream.accepted.set_exception(error) if error else stream.accepted.set_result(True)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_commands()
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                else:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
        except BaseException as err:  # a bug in the engine: fail every request, keep the server up
            self._error = err
            for stream in list(self._streams.values()):
                self._resolve(stream, EngineDead(repr(err)))
                self._deliver(stream, EngineDead(repr(err)))
            raise

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, params = command
                stream = self._streams.get(request_id)
                if stream is None:  # cancelled before the engine saw it
                    continue
                try:
                    self.engine.add_request(prompt_ids, params, request_id=request_id)
                except UserError as err:
                    self._streams.pop(request_id, None)
                    self._resolve(stream, err)
                    continue
                self._resolve(stream, None)
            elif command[0] == "abort":
                self.engine.abort(command[1])

    def _dispatch(self, outputs: Iterable[Any]) -> None:
        by_request: dict[str, list] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        for request_id, outs in by_request.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                self._deliver(stream, outs)


# ----------------------------------------------------------------------------- text


class TextStream:
    """Incremental detokenizer with stop strings, for one choice.

    ``push(new_ids)`` returns the text that is safe to show now. Decoding works on a window
    (``ids[prefix:]`` minus ``ids[prefix:read]``) so each call costs O(window), and
    decoders that strip a leading space stay consistent. Text is held back while it ends in
    an incomplete UTF-8 sequence (U+FFFD) or could be the start of a stop string. When a stop
    string appears, the text is cut before it and ``stopped`` becomes True.
    ``hidden_ids`` (e.g. the chat end-of-turn token) are never shown.
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str] = (), hidden_ids: Iterable[int] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hidden = set(hidden_ids)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window into ids: [prefix, read) already decoded
        self.text = ""  # decoded so far (including held-back text)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, new_ids: Iterable[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.extend(i for i in new_ids if i not in self.hidden)
        if len(self.ids) > self.read:
            before = self.tok.decode(self.ids[self.prefix : self.read])
            after = self.tok.decode(self.ids[self.prefix :])
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                self.text += after[len(before) :]
                self.prefix, self.read = self.read, len(self.ids)
        return self._release(final)

    def _release(self, final: bool) -> str:
        if self.stop:
            # Only the unreleased tail (plus a stop string's length of context) can hold a new match.
            start = max(0, self.emitted - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._stop_prefix_len()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
