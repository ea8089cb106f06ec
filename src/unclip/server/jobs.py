"""A bounded job queue served by worker threads, with progress events for SSE.

A :class:`Job` wraps one pipeline call ``fn(progress)``. :class:`JobQueue` holds at most
``queue_size`` waiting jobs; :meth:`JobQueue.submit` raises :class:`QueueFull` (with a
Retry-After estimate) instead of waiting, so the server answers 429 and never piles up work.
Each job records a short list of events (``queued``, ``started``, ``progress``, ``done``)
that the SSE endpoint replays and follows; the pipeline's ``progress(stage, event)``
callback (a :class:`~unclip.pipeline.events.ProgressEvent`) feeds them and is also where a job notices that it was cancelled or ran past its
deadline (it raises :class:`JobCancelled`, which unwinds the sampler at the next step).

Nothing here imports FastAPI or torch: the queue is plain threads and can be tested alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unclip.pipeline.events import ProgressEvent

log = logging.getLogger("unclip.server")

#: job states; the last three are final
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
#: the fewest seconds between two progress events of a job (the last step of a stage is
#: always sent), so a fast pipeline does not flood the event list
PROGRESS_INTERVAL = 0.05
MAX_EVENTS = 256

ProgressFn = Callable[[str, Any], None]


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting jobs; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the job queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """Raised inside a running job that was cancelled (``reason``: cancelled, timeout,
    shutdown)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Event:
    """One server-sent event: ``id`` increases by one per job, ``name`` is the SSE event."""

    id: int
    name: str
    data: dict[str, Any]


@dataclass
class _Tracker:
    """Turns ``progress(stage, event)`` calls into image numbers and a fraction done.

    ``stages``: the stages each image goes through, in order; a batch of ``count`` images is
    done at the last step of the last one (stages not listed, such as ``invert``, count as 0).
    """

    images: int
    stages: Sequence[str]
    done: int = 0
    fraction: float = 0.0

    def update(self, stage: str, index: int, total: int, count: int = 1) -> dict[str, Any]:
        count = max(1, min(count, self.images - self.done))
        image = min(self.done + count, self.images)  # the last image of the running batch
        within = 0.0
        if stage in self.stages:
            part = (self.stages.index(stage) + (index + 1) / max(total, 1)) / len(self.stages)
            within = part * count
        if stage == self.stages[-1] and index == total - 1:
            self.done = min(self.done + count, self.images)
            within = 0.0
        self.fraction = max(self.fraction, min(1.0, (self.done + within) / self.images))
        return {
            "stage": stage,
            "step": index + 1,
            "steps": total,
            "image": image,
            "batch": count,
            "images": self.images,
            "fraction": round(self.fraction, 4),
        }


class Job:
    """One unit of work: ``fn(progress)`` run on a worker thread.

    ``images`` and ``stages`` describe the expected progress (see :class:`_Tracker`);
    ``timeout`` (seconds from creation, None = none) bounds queueing plus running.
    ``meta`` is free for the caller (the server keeps the request's output options there).
    """

    def __init__(
        self,
        fn: Callable[[ProgressFn], Any],
        *,
        kind: str = "job",
        images: int = 1,
        stages: Sequence[str] = ("decoder",),
        timeout: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.id = secrets.token_hex(16)
        self.kind = kind
        self.fn = fn
        self.meta = meta or {}
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.status = QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancel_reason: str | None = None
        self.progress_info: dict[str, Any] | None = None
        self._tracker = _Tracker(max(1, images), list(stages) or ["decoder"])
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._next_id = 0
        self._last_progress = 0.0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._done = threading.Event()

    def __repr__(self) -> str:
        return f"Job({self.kind!r}, id={self.id[:8]}, status={self.status})"

    # -- state -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Record an event and wake every waiter (thread-safe)."""
        with self._lock:
            self._events.append(Event(self._next_id, name, data))
            self._next_id += 1
            waiters = list(self._waiters)
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: its waiter is gone
                loop.call_soon_threadsafe(ev.set)

    def events_after(self, last_id: int) -> list[Event]:
        """Events with an id above ``last_id`` (-1: all that are still kept)."""
        with self._lock:
            return [e for e in self._events if e.id > last_id]

    def cancel(self, reason: str = "cancelled") -> bool:
        """Ask the job to stop: a queued job ends now, a running one at its next step.
        Returns False when the job had already finished."""
        with self._lock:
            if self._done.is_set():
                return False
            if self.cancel_reason is None:
                self.cancel_reason = reason
            queued = self.status == QUEUED
        if queued:
            self._finish(CANCELLED, error=JobCancelled(reason))
        return True

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled or is past its deadline."""
        if self.cancel_reason is not None:
            raise JobCancelled(self.cancel_reason)
        if self.deadline is not None and time.monotonic() > self.deadline:
            with self._lock:
                self.cancel_reason = self.cancel_reason or "timeout"
            raise JobCancelled(self.cancel_reason)

    def progress(self, stage: str, event: ProgressEvent) -> None:
        """The pipeline's progress callback: record a progress event, honour cancellation."""
        self.check()
        index, total = event.index, event.total
        info = self._tracker.update(stage, index, total, event.images)
        self.progress_info = info
        now = time.monotonic()
        if index == total - 1 or now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            self.emit("progress", info)

    def run(self) -> None:
        """Run ``fn`` on this thread and record the outcome (never raises)."""
        with self._lock:
            if self._done.is_set():
                return
            self.status = RUNNING
            self.started = time.time()
        self.emit("started", {"status": RUNNING})
        try:
            self.check()
            result = self.fn(self.progress)
        except JobCancelled as e:
            self._finish(CANCELLED, error=e)
        except Exception as e:
            if not isinstance(e, (ValueError, TypeError)):
                log.exception("job %s (%s) failed", self.id, self.kind)
            self._finish(FAILED, error=e)
        else:
            self._finish(SUCCEEDED, result=result)

    def _finish(
        self, status: str, *, result: Any = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.status = status
            self.result = result
            self.error = error
            self.finished = time.time()
            self._done.set()
        self.emit("done", {"status": status})

    # -- waiting -----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread until the job is done; False on timeout."""
        return self._done.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait on the event loop until the job is done; False on timeout."""
        async for _ in self.follow(-1, timeout=timeout, heartbeat=None):
            pass
        return self.done

    async def follow(
        self, last_id: int = -1, *, timeout: float | None = None, heartbeat: float | None = 15.0
    ) -> AsyncIterator[Event | None]:
        """Yield the events after ``last_id`` as they come, until the ``done`` event; None
        every ``heartbeat`` seconds without news (for SSE keep-alive comments). Stops
        silently after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        waiter = (loop, ev)
        with self._lock:
            self._waiters.add(waiter)
        end = None if timeout is None else loop.time() + timeout
        try:
            while True:
                ev.clear()
                events = self.events_after(last_id)
                for event in events:
                    last_id = event.id
                    yield event
                    if event.name == "done":
                        return
                if self.done and not events:
                    return
                if events:
                    continue
                wait = heartbeat
                if end is not None:
                    left = end - loop.time()
                    if left <= 0:
                        return
                    wait = left if wait is None else min(wait, left)
                try:
                    await asyncio.wait_for(ev.wait(), wait)
                except asyncio.TimeoutError:
                    if heartbeat is not None and (end is None or loop.time() < end):
                        yield None
        finally:
            with self._lock:
                self._waiters.discard(waiter)


@dataclass
class _Stats:
    finished: int = 0
    mean_seconds: float | None = None
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=20))


class JobQueue:
    """At most ``queue_size`` waiting jobs, run by ``workers`` daemon threads in order."""

    def __init__(self, workers: int = 1, queue_size: int = 8, name: str = "unclip-worker") -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.workers = workers
        self.queue_size = queue_size
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._running: set[Job] = set()
        self._stats = _Stats()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean duration of the last jobs
        (2 s before any has finished) shared among the workers, at least 1."""
        with self._lock:
            mean = self._stats.mean_seconds
        per_job = 2.0 if mean is None else mean
        return int(min(600, max(1, math.ceil(per_job / self.workers))))

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raise :class:`QueueFull` when ``queue_size`` jobs are waiting."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job queue is closed")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                full = True
            else:
                full = False
        if full:
            raise QueueFull(self.retry_after())
        job.emit("queued", {"status": QUEUED, "position": self.queued})
        return job

    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if job.done:  # cancelled while it waited
                continue
            with self._lock:
                self._running.add(job)
            start = time.monotonic()
            try:
                job.run()
            finally:
                seconds = time.monotonic() - start
                with self._lock:
                    self._running.discard(job)
                    if job.status == SUCCEEDED:
                        s = self._stats
                        s.finished += 1
                        s.durations.append(seconds)
                        s.mean_seconds = sum(s.durations) / len(s.durations)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel waiting and running jobs, stop the workers, wait up to ``timeout`` s."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._running)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.cancel("shutdown")
        for job in running:
            job.cancel("shutdown")
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
