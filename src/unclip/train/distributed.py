"""Multi-process training on PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

Nothing here is needed for one process. Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables) :func:`setup` joins the process group — gloo on
CPU, nccl on CUDA — and every ``unclip train STAGE`` runs unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "barrier",
    "default_threads",
    "exit_after_group",
    "is_distributed",
    "mean_over_ranks",
    "physical_cores",
    "set_threads",
    "setup",
    "teardown",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: torch.device | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (idempotent).

    Returns rank 0 of 1 when not launched by torchrun. ``device``: where this rank trains
    (CUDA: ``cuda:LOCAL_RANK`` is selected here and nccl is used; otherwise gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores this process may run on: hyperthread siblings count once.

    Linux: the distinct ``(physical id, core id)`` pairs of ``/proc/cpuinfo`` (or the text
    ``cpuinfo``) among the CPUs of ``os.sched_getaffinity`` (a container or ``taskset`` may
    allow fewer), never more than those CPUs; elsewhere, or where cpuinfo names no cores (some
    ARM kernels), the CPUs the process may use."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip()] = value.strip()
        if "processor" not in fields or "core id" not in fields:
            continue
        if allowed is not None and int(fields["processor"]) not in allowed:
            continue
        cores.add((fields.get("physical id", "0"), fields["core id"]))
    return max(1, min(len(cores), logical) if cores else logical)


#: ``UNCLIP_THREADS=N`` sets the default of ``unclip train --threads`` (a job script's choice
#: for every command it runs; the test suite's one thread)
THREADS_ENV = "UNCLIP_THREADS"


def default_threads() -> int:
    """CPU threads for one training process: ``UNCLIP_THREADS`` where set, else the physical
    cores shared out among the processes ``torchrun`` started on this machine
    (``LOCAL_WORLD_SIZE``); at least 1."""
    chosen = os.environ.get(THREADS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"{THREADS_ENV}={chosen!r}: expected a whole number of at least 1")
        return int(chosen)
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, physical_cores() // local_world)


def set_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads (None: :func:`default_threads`); returns them.

    The inter-op pool (used only by ``torch.jit.fork``) gets the same number where torch still
    allows it (once per process, before any parallel work); otherwise it is left as it is."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work has started
        torch.set_num_interop_threads(n)
    return n


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_left_group = False  # set by teardown() in a multi-process group


def teardown() -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group`` (a rank
    that exits while gloo still talks to another can abort in gloo's threads). Call it when a
    training command is done; a no-op outside torchrun."""
    global _left_group
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
            _left_group = True
        dist.destroy_process_group()


def exit_after_group(code: int) -> None:
    """End the process now, with ``code``, if it took part in a multi-process group.

    After ``destroy_process_group`` a process-group object that FSDP/DDP still reference can
    be destroyed during interpreter shutdown, where gloo's worker threads abort the process
    ("terminate called without an active exception", exit -6: torchrun then reports a failed
    run although every rank finished). Everything is saved by then, so the output streams are
    flushed and the process leaves without running the shutdown. A no-op otherwise."""
    if _left_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (the number itself in one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (a collective: call it on all ranks)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
