"""A model shared by many callers: one scheduler thread drives `generate.Batch` (continuous batching).

Callers `submit` a job (a function that builds a `Request`: image processing and the vision tower run in
the engine thread too, so one thread owns the model) and read events from the returned `Handle`. Between
decode steps the engine admits queued jobs into free rows (prefill), drops cancelled ones and lets
finished ones leave, so active requests share every decode step.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from phi3v.api import Phi3V
from phi3v.errors import Phi3VError
from phi3v.generate import Batch, Event, Request


class QueueFull(Exception):
    """The engine already holds `max_queue` waiting jobs."""


@dataclass(frozen=True)
class Failed:
    """A job that could not start: the error, as a user error or not."""

    error: Exception


class Handle:
    """The caller's side of one job: events arrive on `events` (Event, then more until one has a
    finish_reason; or a single Failed)."""

    def __init__(self, build: Callable[[], Request], on_event: Callable[[Any], None] | None = None):
        self.build, self.events = build, queue.Queue()
        self.on_event = on_event or self.events.put
        self.request: Request | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating for this job at the next step (for example, its client disconnected)."""
        self.cancelled = True


class Engine:
    """Continuous batching over one model: at most `max_batch` active rows and `max_queue` waiting jobs."""

    def __init__(self, model: Phi3V, max_batch: int = 16, max_queue: int = 64):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.batch = Batch(model.model, model.tokenizer)
        self.waiting: collections.deque[Handle] = collections.deque()
        self.running: dict[Request, Handle] = {}
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="phi3v-engine", daemon=True)
        self.thread.start()

    def submit(self, build: Callable[[], Request], on_event: Callable[[Any], None] | None = None) -> Handle:
        """Queue a job; raises QueueFull when `max_queue` jobs are already waiting."""
        handle = Handle(build, on_event)
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(handle)
            self.wake.notify()
        return handle

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=30)

    @property
    def load(self) -> dict[str, int]:
        return {"active": len(self.batch), "waiting": len(self.waiting)}

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not self.stopped and not self.waiting and not len(self.batch):
                    self.wake.wait()
                if self.stopped:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if len(self.batch):
                    self._deliver(self.batch.step())
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail the running jobs, keep serving
                for req, handle in list(self.running.items()):
                    self.batch.drop(req)
                    handle.on_event(Failed(RuntimeError(f"generation failed: {e}")))
                self.running.clear()

    def _admit(self, max_tokens: int = 8192) -> None:
        """Build waiting jobs into free rows and prefill them together (up to `max_tokens` prompt tokens)."""
        ready: list[Request] = []
        while len(self.batch) + len(ready) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    break
                handle = self.waiting.popleft()
            if handle.cancelled:
                continue
            try:
                req = handle.build()
                self.batch.check(req)
            except Exception as e:  # noqa: BLE001 - delivered to the caller, the engine keeps serving
                handle.on_event(Failed(e if isinstance(e, Phi3VError) else RuntimeError(str(e))))
                continue
            handle.request = req
            self.running[req] = handle
            ready.append(req)
            if sum(r.prompt_tokens for r in ready) >= max_tokens:
                break
        if ready:
            self._deliver(self.batch.add_many(ready))

    def _drop_cancelled(self) -> None:
        for req, handle in list(self.running.items()):
            if handle.cancelled:
                self.batch.drop(req)
                del self.running[req]

    def _deliver(self, events: list[Event]) -> None:
        for e in events:
            handle = self.running.get(e.request)
            if handle is None:
                continue
            if e.finish_reason is not None:
                del self.running[e.request]
            handle.on_event(e)
