"""The engine thread: one thread steps the engine; HTTP handlers talk to it by queues.

A stage's engine is synchronous and owned by one caller, while the HTTP handlers run as
asyncio tasks. So one thread owns the engine: it takes commands (add a request, abort
one) from a thread-safe queue between two steps, steps while anything is unfinished, and
hands each request's outputs to that request's asyncio queue on the event loop
(`call_soon_threadsafe`). A handler that stops listening (its client went away) aborts
its request, which frees its KV blocks at the next command drain.

Introduced after M7 (issue 25).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass


class Overloaded(Exception):
    """More requests wait than `max_waiting` allows: answered 503."""


@dataclass
class Stream:
    """Where one request's outputs go: its queue on the event loop."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown): nobody listens
            pass


class EngineLoop:
    """Runs `engine` on a thread. `max_waiting`: how many requests may wait beyond the
    ones the engine runs at once (`max_batch_size`) before new ones are refused."""

    def __init__(self, engine, max_waiting: int) -> None:
        self.engine = engine
        self.capacity = engine.config.max_batch_size + max_waiting
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, Stream] = {}  # the engine thread's, after an "add"
        self.open_requests = 0  # the event loop's count: added and not yet ended
        self.snapshot: dict = {}  # the engine's queues and KV cache after the last step
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- the event loop's side ---------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Abort what is left and end the thread."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    def add(self, request_id: str, prompt, params) -> asyncio.Queue:
        """Queue a request; its outputs (RequestOutput, then None at the end, or an
        exception) arrive on the returned queue."""
        if self.open_requests >= self.capacity:
            raise Overloaded(f"{self.open_requests} requests are running or waiting; the "
                             f"server takes {self.capacity} (max_batch_size + --max-waiting)")
        stream = Stream(asyncio.get_running_loop(), asyncio.Queue())
        self.open_requests += 1
        self.commands.put(("add", request_id, prompt, params, stream))
        self.wake.set()
        return stream.outputs

    def release(self, request_id: str, finished: bool) -> None:
        """A handler is done with its request: abort it unless it finished."""
        self.open_requests -= 1
        if not finished:
            self.commands.put(("abort", request_id))
            self.wake.set()

    # -- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping:
            self._drain_commands()
            self.snapshot = self._snapshot()
            if not self.engine.has_unfinished_requests():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # every open request ends with the error
                self._fail_all(exc)
                continue
            for output in outputs:
                stream = self.streams.get(output.request_id)
                if stream is None:
                    continue
                stream.put(output)
                if output.finished:
                    del self.streams[output.request_id]
                    stream.put(None)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command, request_id, *args = self.commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                prompt, params, stream = args
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as exc:  # a prompt too long, n too large, ...
                    stream.put(exc)
                    continue
                self.streams[request_id] = stream
            elif self.streams.pop(request_id, None) is not None:  # "abort"
                self.engine.abort_request(request_id)

    def _snapshot(self) -> dict:
        """The numbers /metrics shows, read on this thread (a new dict each time)."""
        scheduler = self.engine.scheduler
        kv = {k: v for k, v in self.engine.kv_cache_stats().items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return dict(running=len(scheduler.running), waiting=len(scheduler.waiting), kv=kv)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, stream in list(self.streams.items()):
            self.engine.abort_request(request_id)
            stream.put(exc)
        self.streams.clear()
