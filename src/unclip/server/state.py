"""The server's state, one per app (``app.state.unclip``): the pipeline, the limits, the
API key, the image stores, the job queue and the async jobs kept for lookups.

Route handlers reach it with :func:`state`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from unclip.server.gallery import Gallery, MemoryStore, valid_id
from unclip.server.jobs import Job, JobQueue
from unclip.server.limits import Limits

if TYPE_CHECKING:
    from unclip.pipeline.events import ImageInfo

__all__ = ["JOB_TTL", "MAX_KEPT_BYTES", "MAX_KEPT_JOBS", "Result", "ServerState", "state"]

#: finished async jobs (and their results) are kept this long (seconds), at most this many,
#: and results of at most this many bytes of image files in all (oldest dropped first)
JOB_TTL = 600.0
MAX_KEPT_JOBS = 256
MAX_KEPT_BYTES = 256 * 2**20


@dataclass
class Result:
    """One output image: its id in the store (None when not stored), its file (kept for
    ``b64_json`` and streamed answers only) in format ``fmt``, its metadata (typed) and size."""

    id: str | None
    data: bytes | None
    info: ImageInfo
    size: int
    fmt: str = "png"


class ServerState:
    """What every route reads: the pipeline, :class:`Limits`, the API key (or None), the
    gallery (or None: results live in the in-memory store), the job queue and the async
    jobs by id."""

    def __init__(
        self,
        pipe: Any,
        *,
        workers: int,
        queue_size: int,
        limits: Limits,
        api_key: str | None,
        gallery: Gallery | None,
        gallery_keep_b64: bool = False,
    ) -> None:
        self.pipe = pipe
        self.limits = limits
        self.api_key = api_key
        self.gallery = gallery
        self.gallery_keep_b64 = gallery_keep_b64
        self.memory = MemoryStore()
        self.queue = JobQueue(workers, queue_size)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.started = time.time()

    @property
    def store(self) -> Gallery | MemoryStore:
        return self.gallery if self.gallery is not None else self.memory

    def file(self, image_id: str) -> tuple[bytes, str] | None:
        """A stored result's file and format (gallery first, then memory), or None."""
        if not valid_id(image_id):
            return None
        if self.gallery is not None:
            found = self.gallery.get_file(image_id)
            if found is not None:
                return found
        return self.memory.get_file(image_id)

    def remember(self, job: Job) -> None:
        """Register an async job; forget finished ones past :data:`JOB_TTL`, beyond
        :data:`MAX_KEPT_JOBS` or :data:`MAX_KEPT_BYTES` of results, oldest first."""
        now = time.time()
        finished = [j for j in self.jobs.values() if j.done]
        total = sum(result_bytes(j) for j in finished)
        for old in finished:
            expired = old.finished is not None and now - old.finished > JOB_TTL
            if expired or len(self.jobs) >= MAX_KEPT_JOBS or total > MAX_KEPT_BYTES:
                total -= result_bytes(old)
                del self.jobs[old.id]
        self.jobs[job.id] = job

    def upsampler_stages(self) -> list[str]:
        from unclip.pipeline.config import upsampler_name

        n = len(getattr(self.pipe, "upsamplers", []) or [])
        return [upsampler_name(k) for k in range(n)]


def result_bytes(job: Job) -> int:
    return sum(len(r.data or b"") for r in job.result or [])


def state(request: Request) -> ServerState:
    """The state of the app that ``request`` came to."""
    return request.app.state.unclip
