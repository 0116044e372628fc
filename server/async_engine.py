"""The engine behind the HTTP server: one dedicated thread runs `LLMEngine.step()`.

The event loop never blocks on the model. Requests go to the engine thread through
thread-safe inboxes (new requests, aborts); each step's outputs come back to the loop with
`loop.call_soon_threadsafe` into one asyncio queue per request. The thread sleeps on a
condition while there is no work.

Invariants:
- every request that `generate` accepted ends with exactly one finished output (or an
  exception) unless its consumer went away first, in which case it is aborted;
- an exception in `step()` fails the requests the engine was holding (finish_reason
  "error"), aborts them so their blocks are freed, and the loop goes on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from server.config import EngineConfig
from server.outputs import RequestOutput
from server.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.engine import LLMEngine

logger = logging.getLogger("gorgon.engine")
IDLE_STEP_PAUSE_S = 0.001


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineNotReadyError(RuntimeError):
    """The engine is still loading, failed to load, or is shutting down."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue          # of RequestOutput | BaseException
    in_engine: bool = False       # add_request succeeded (owned by the engine thread)


def _default_factory(config: EngineConfig) -> Callable[[], "LLMEngine"]:
    def build():
        from server.engine import LLMEngine
        return LLMEngine(config)
    return build


class AsyncEngine:
    """Drives an `LLMEngine` from a dedicated thread; `generate` streams its outputs."""

    def __init__(self, config: EngineConfig, engine_factory: Callable[[], "LLMEngine"] | None = None):
        self.config = config
        self._factory = engine_factory or _default_factory(config)
        self.engine: LLMEngine | None = None
        self.load_error: BaseException | None = None
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, list[int], SamplingParams]] = []   # guarded by _cond
        self._aborts: list[str] = []                                     # guarded by _cond
        self._streams: dict[str, _Stream] = {}                           # guarded by _cond
        self._stop = False
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()

    # ---- state -----------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        """Loaded and accepting requests (what /health reports)."""
        return self.engine is not None and self._accepting

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's queue plus the inbox it has not taken yet."""
        engine_waiting = self.engine.num_waiting if self.engine is not None else 0
        return engine_waiting + len(self._inbox)

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; it loads the model first (is_ready turns True after)."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="gorgon-engine", daemon=True)
        self._thread.start()

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def stop_accepting(self) -> None:
        """New requests are refused from now on; running ones go on."""
        self._accepting = False

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `timeout` s, abort the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = self.abort_all()
        if leftover:
            logger.warning("shutdown: aborted %d unfinished request(s)", leftover)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    def abort_all(self) -> int:
        """Abort every request; each one's stream ends with a finish_reason "abort" output."""
        with self._cond:
            leftover = list(self._streams.items())
            self._streams.clear()
            self._inbox.clear()
            self._aborts.extend(request_id for request_id, _ in leftover)
            self._cond.notify()
        for request_id, stream in leftover:
            out = RequestOutput(request_id, "", [], "abort", 0, 0, error="the server is shutting down")
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            except RuntimeError:  # its loop is closed
                pass
        return len(leftover)

    # ---- requests (event-loop side) --------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Closing the iterator early aborts the request.

        Raises EngineNotReadyError, QueueFullError, or ValueError (the engine refused the
        request, e.g. a prompt that can never fit) before any output.
        """
        stream = self.submit(request_id, prompt_ids, params)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.is_finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> _Stream:
        """Hand a request to the engine thread; admission checks happen here, synchronously."""
        if not self.is_ready:
            raise EngineNotReadyError("the engine is not ready (loading or shutting down)")
        if self.num_waiting >= self.config.max_queue_size:
            raise QueueFullError(f"the request queue is full ({self.config.max_queue_size} waiting); retry later")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
            self._inbox.append((request_id, list(prompt_ids), params))
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished). Safe from any thread."""
        with self._cond:
            if self._streams.pop(request_id, None) is None:
                return
            self._inbox = [r for r in self._inbox if r[0] != request_id]
            self._aborts.append(request_id)
            self._cond.notify()

    # ---- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - reported through /health and the log
            self.load_error = e
            logger.exception("engine failed to load")
            self._loaded.set()
            return
        with self._cond:
            self._accepting = not self._stop  # a shutdown may have come while loading
        self._loaded.set()
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stop or self.engine.has_unfinished_requests()):
                    self._cond.wait()
                new, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                if self._stop and not new and not self.engine.has_unfinished_requests() and not aborts:
                    break
            for request_id in aborts:
                self._safely(self.engine.abort_request, request_id)
            for request_id, prompt_ids, params in new:
                self._add(request_id, prompt_ids, params)
            if self.engine.has_unfinished_requests():
                self._step()
        logger.info("engine thread stopped")

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            self._deliver([(request_id, e if isinstance(e, ValueError) else RuntimeError(str(e)))])
            return
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.in_engine = True
        if stream is None:  # aborted while it sat in the inbox, after the abort list was taken
            self._safely(self.engine.abort_request, request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
            logger.exception("engine step failed; failing the requests it held")
            with self._cond:
                held = [(rid, s) for rid, s in self._streams.items() if s.in_engine]
            failed = []
            for request_id, _ in held:
                self._safely(self.engine.abort_request, request_id)
                failed.append((request_id, RequestOutput(request_id, "", [], "error", 0, 0,
                                                         error=f"engine step failed: {e}")))
            self._deliver(failed)
            return
        if not outputs:
            time.sleep(IDLE_STEP_PAUSE_S)  # nothing progressed (e.g. all blocked on KV space): don't spin
        self._deliver([(out.request_id, out) for out in outputs])

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand outputs to their requests' loops; a finished request leaves the table here."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._cond:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue  # aborted: no further output
                if isinstance(item, BaseException) or item.is_finished:
                    del self._streams[request_id]
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            logger.exception("%s%r failed", getattr(fn, "__name__", fn), args)


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
