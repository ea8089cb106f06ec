"""unclip.allocator: glibc's malloc keeps freed activations for reuse.

The checks run in child processes, since the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unclip import allocator

REPO = Path(__file__).resolve().parent.parent

glibc = pytest.mark.skipif(
    allocator._glibc() is None, reason="the setting exists only where the C library is glibc"
)

# A one-image guided decoder call at emoji-small's sizes, as a sampling loop makes it: with
# glibc's defaults the activations freed at the end of each call go back to the kernel (or
# come from fresh mmap pages) and the next call faults them in again, page by page.
_LOOP = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from unclip import allocator
    from unclip.commands.random_pipelines import stage_configs_from_dir
    from unclip.decoder.unet import UNet
    applied = allocator.keep_freed_memory() if sys.argv[1] == "call" else None
    torch.manual_seed(0)
    net = UNet(stage_configs_from_dir(sys.argv[2]).decoder).eval()
    s = net.config.image_size
    x, t, z = torch.randn(2, 3, s, s), torch.full((2,), 500), torch.randn(2, net.config.clip_dim)
    with torch.no_grad():
        for _ in range(3):
            net(x, t, image_emb=z)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            net(x, t, image_emb=z)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    again = allocator.keep_freed_memory() if applied is not None else None
    print(json.dumps({"applied": applied, "again": again, "faults": faults}))
    """
)


def _run(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _LOOP, mode, str(REPO / "configs" / "emoji-small")],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_kept_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    default = _run("default")
    kept = _run("call")
    assert kept["applied"] is True and kept["again"] is True
    # 1,200-1,800 pages faulted in per call on this machine against 0-20
    assert default["faults"] > 300
    assert kept["faults"] < default["faults"] / 10


@glibc
def test_the_environment_variable_leaves_the_allocator_alone() -> None:
    r = _run("call", **{allocator.KEEP_FREED_MEMORY_ENV: "0"})
    assert r["applied"] is False and r["again"] is False
    assert r["faults"] > 300


def test_nothing_is_set_where_the_c_library_is_not_glibc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(allocator, "_state", {})
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False


def test_the_first_answer_holds_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator, "_state", {})
    monkeypatch.setattr(allocator, "_glibc", lambda: FakeLibc())
    monkeypatch.delenv(allocator.KEEP_FREED_MEMORY_ENV, raising=False)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert calls == [
        (allocator._M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),
        (allocator._M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD),
    ]


def test_a_refused_setting_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class RefusingLibc:
        def mallopt(self, param: int, value: int) -> int:
            return 0

    monkeypatch.setattr(allocator, "_state", {})
    monkeypatch.setattr(allocator, "_glibc", lambda: RefusingLibc())
    monkeypatch.delenv(allocator.KEEP_FREED_MEMORY_ENV, raising=False)
    assert allocator.keep_freed_memory() is False
