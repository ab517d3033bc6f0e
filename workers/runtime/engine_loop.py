"""One thread that drives a model's engine for the whole process, fed by every shard the process holds.

Shard runners (other threads) `submit` their requests and get an EngineHandle; the loop adds them to
the engine between steps, steps while anything is unfinished, and hands each finished result to its
handle's queue, so the submitting thread writes results to the database while the engine goes on.
Requests of all handles share the running batch, so it stays full across shard and batch boundaries.
An EngineFailure (out of memory) fails every handle the engine held; the loop then starts clean.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from workers.runtime.engine import Engine
from workers.runtime.errors import EngineFailure
from workers.runtime.types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineHandle:
    """The requests of one submit (GenerationHandle): results arrive on a queue as each finishes."""

    def __init__(self, loop: EngineLoop, ids: list[str]) -> None:
        self._loop = loop
        self.ids = ids  # engine request ids
        self._queue: queue.SimpleQueue[GenerationResult | EngineFailure] = queue.SimpleQueue()
        self._left = len(ids)  # results not yet returned by `results`
        self._aborted = False

    @property
    def done(self) -> bool:
        return self._aborted or self._left == 0

    def results(self, timeout: float) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        if self.done:
            return out
        try:
            item = self._queue.get(timeout=timeout)
            while True:
                if isinstance(item, EngineFailure):
                    self._aborted = True
                    raise item
                out.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        self._left -= len(out)
        return out

    def abort(self) -> None:
        if not self.done:
            self._aborted = True
            self._loop.abort(self.ids)

    def _deliver(self, item: GenerationResult | EngineFailure) -> None:
        self._queue.put(item)


class EngineLoop:
    """Owns an Engine and the thread that steps it (started at the first submit)."""

    def __init__(self, engine: Engine, name: str = "engine") -> None:
        self.engine = engine
        self.name = name
        self._inbox: list[Callable[[], None]] = []  # engine calls to make between steps
        self._owners: dict[str, EngineHandle] = {}  # engine request id -> handle (touched on the loop thread)
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(self, requests: list[GenerationRequest]) -> EngineHandle:
        """Queues requests into the running engine; their results come through the handle."""
        ids = [f"{next(self._ids)}:{r.request_id}" for r in requests]
        handle = EngineHandle(self, ids)

        def add() -> None:
            for request_id, request in zip(ids, requests, strict=True):
                self._owners[request_id] = handle
                self.engine.add_request(request_id, request)

        self._call(add)
        return handle

    def abort(self, ids: list[str]) -> None:
        def drop() -> None:
            self.engine.abort(ids)
            for request_id in ids:
                self._owners.pop(request_id, None)

        self._call(drop)

    def _call(self, fn: Callable[[], None]) -> None:
        with self._wake:
            self._inbox.append(fn)
            if self._thread is None:
                self._thread = threading.Thread(target=self.run_here, name=f"{self.name}-loop", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stops the loop thread after its current step and waits for it (before the process exits: a
        thread inside torch at interpreter exit aborts the process). A later submit starts a new one."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._wake:
            self._closing = False
            self._thread = None

    def run_here(self) -> None:
        """Steps the engine on the calling thread, forever (see run_on_engine_thread)."""
        with self._wake:
            self._thread = self._thread or threading.current_thread()
        self._run()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.engine.has_unfinished() and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                calls, self._inbox = self._inbox, []
            try:
                for fn in calls:
                    fn()
                if not self.engine.has_unfinished():
                    continue
                finished = self.engine.step()
            except Exception as exc:  # EngineFailure, or a bug: never leave a handle waiting forever
                failure = exc if isinstance(exc, EngineFailure) else EngineFailure(f"{type(exc).__name__}: {exc}")
                log.exception("engine %s failed; failing every request it held", self.name)
                self._fail_all(failure)
                continue
            for request_id, result in finished.items():
                handle = self._owners.pop(request_id, None)
                if handle is not None:
                    handle._deliver(result)

    def _fail_all(self, failure: EngineFailure) -> None:
        handles = {id(h): h for h in self._owners.values()}.values()
        self.engine.abort(list(self._owners))
        self._owners.clear()
        for handle in handles:
            handle._deliver(failure)


def run_on_engine_thread(load: Callable[[], T], loop_of: Callable[[T], EngineLoop], name: str) -> T:
    """load() on a new daemon thread that then drives the loaded model's engine loop; returns load()'s value.

    The thread that loads the weights runs torch's first parallel kernels and, measured here, keeps
    the fast OpenMP team: the same 128 catalog requests ran 545 tok/s when one thread loaded and
    stepped, 215 tok/s when the main thread loaded and another thread stepped. So a model's engine
    thread is the one that loads it. load()'s exception is raised here.
    """
    done = threading.Event()
    box: dict[str, object] = {}

    def main() -> None:
        try:
            box["value"] = value = load()
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller
            box["error"] = exc
            done.set()
            return
        loop = loop_of(value)
        with loop._wake:
            loop._thread = threading.current_thread()
        done.set()
        loop.run_here()

    threading.Thread(target=main, name=f"{name}-engine", daemon=True).start()
    done.wait()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
