"""Freed host memory kept for reuse: glibc's malloc set for a loop of network calls.

A sampling or training loop allocates and frees the same few-megabyte activations at every
step. With its default settings glibc serves such blocks from fresh ``mmap`` pages once they
pass its (dynamic) mmap threshold, and hands the top of its heap back to the kernel once more
than its trim threshold lies free there; either way the next step's tensors touch new pages,
and the kernel zeroes each 4 KiB page in the thread that faults on it (measurements:
docs/benchmarks.md, issue 34).

:func:`keep_freed_memory` raises both thresholds once per process, so freed activations stay
in the heap and the next step reuses them. Each malloc arena (about one per thread that
allocates) keeps up to ``TRIM_THRESHOLD`` of freed memory at its top instead of returning
it, so the process's peak is unchanged but its size falls back more slowly; blocks over
``MMAP_THRESHOLD`` (large weights, a big CPU training batch) still come from ``mmap``.
Every sampler run (``unclip.pipeline.runners.running``), the trainer and ``unclip bench``
call it; set ``UNCLIP_KEEP_FREED_MEMORY=0`` to leave the allocator as it is (a long-lived
server short of memory, say). Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

#: blocks larger than this still come from mmap and go back to the kernel when freed
#: (glibc's own ceiling for its dynamic threshold, DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the top of the heap is handed back to the kernel only beyond this
TRIM_THRESHOLD = 256 * 2**20
#: set to "0" to leave glibc's malloc settings untouched
KEEP_FREED_MEMORY_ENV = "UNCLIP_KEEP_FREED_MEMORY"

# mallopt's parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # no process-wide handle to the C library
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to ``MMAP_THRESHOLD`` and ``TRIM_THRESHOLD``
    (see the module docstring), at the first call of the process; later calls return the first
    one's answer. True when the settings are in effect; False where the C library is not
    glibc on Linux, where ``UNCLIP_KEEP_FREED_MEMORY=0``, or where glibc refused either (the
    other may then be in effect)."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = [
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]  # both tried: one refused leaves the other in effect
    return all(done)
