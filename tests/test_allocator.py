"""unclip.allocator: glibc's malloc keeps freed activations for reuse.

The checks run in child processes, since the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from unclip.pipeline import UnclipPipeline

from python_child import run_python
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
    import ctypes, json, resource, sys
    import torch
    from unclip import allocator
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages on any host
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


# what would set the child's allocator otherwise
_ALLOCATOR_ENV = (allocator.KEEP_FREED_MEMORY_ENV, "GLIBC_TUNABLES", "LD_PRELOAD")

# glibc's starting thresholds (128 KiB), pinned: with its defaults the thresholds move with
# what the process freed before (and in which thread's arena), so how many pages a call faults
# in differs from run to run and machine to machine (a CI run saw 74 per call where this one
# sees thousands). Pinned, every activation over 128 KiB comes from mmap and goes back when
# freed, on any host; keep_freed_memory's mallopt overrides tunables, so the two runs differ
# only in whether it was applied.
_PINNED_LOW = {
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
}


def fresh_answer() -> None:
    """Forget this process's answer (the next call asks again), and again after the test."""
    allocator.keep_freed_memory.cache_clear()


@pytest.fixture(autouse=True)
def _forget_fake_answers() -> Iterator[None]:
    yield
    allocator.keep_freed_memory.cache_clear()


def _run(mode: str, **env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in _ALLOCATOR_ENV and not k.startswith("MALLOC_")
    }
    out = run_python(_LOOP, mode, str(REPO / "configs" / "emoji-small"), env={**clean, **env})
    return json.loads(out.strip().splitlines()[-1])


@glibc
def test_kept_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    low = _run("default", **_PINNED_LOW)
    kept = _run("call", **_PINNED_LOW)
    assert kept["applied"] is True and kept["again"] is True
    # each call faults its activations in again, against next to none
    assert low["faults"] > 300
    assert kept["faults"] < low["faults"] / 10


@glibc
def test_the_environment_variable_leaves_the_allocator_alone() -> None:
    r = _run("call", **_PINNED_LOW, **{allocator.KEEP_FREED_MEMORY_ENV: "0"})
    assert r["applied"] is False and r["again"] is False
    assert r["faults"] > 300  # the pinned thresholds still hold


def test_nothing_is_set_where_the_c_library_is_not_glibc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fresh_answer()
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_no_c_library_is_looked_for_off_linux(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    def cdll(name: object) -> None:  # Windows' ctypes.CDLL(None) raises TypeError
        raise TypeError("no process-wide handle")

    monkeypatch.setattr(allocator.sys, "platform", platform)
    monkeypatch.setattr(allocator.ctypes, "CDLL", cdll)
    assert allocator._glibc() is None


def test_a_c_library_without_a_process_handle_is_no_glibc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cdll(name: object) -> None:
        raise TypeError("no process-wide handle")

    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", cdll)
    assert allocator._glibc() is None


def test_every_sampler_run_asks_for_the_setting(
    monkeypatch: pytest.MonkeyPatch, pipe: UnclipPipeline
) -> None:
    from unclip.pipeline import runners

    calls: list[int] = []
    monkeypatch.setattr(runners, "keep_freed_memory", lambda: calls.append(1) or True)
    pipe.text_to_image("a red square", seed=0, decoder_steps=2, prior_steps=2, upsampler_steps=2)
    assert len(calls) >= 3  # prior, decoder, upsampler


def test_the_trainer_asks_for_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from toy import ToyConfig, ToyData, ToyModel, toy_loss
    from unclip.config import TrainConfig
    from unclip.train import loop

    calls: list[int] = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = TrainConfig(steps=1, batch_size=2)
    loop.Trainer(ToyModel(ToyConfig()), toy_loss, ToyData(), cfg, tmp_path, progress=False)
    assert calls == [1]


def test_the_first_answer_holds_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    fresh_answer()
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

    fresh_answer()
    monkeypatch.setattr(allocator, "_glibc", lambda: RefusingLibc())
    monkeypatch.delenv(allocator.KEEP_FREED_MEMORY_ENV, raising=False)
    assert allocator.keep_freed_memory() is False


def test_both_settings_are_tried_when_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    class HalfLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append(param)
            return int(param == allocator._M_TRIM_THRESHOLD)

    fresh_answer()
    monkeypatch.setattr(allocator, "_glibc", lambda: HalfLibc())
    monkeypatch.delenv(allocator.KEEP_FREED_MEMORY_ENV, raising=False)
    assert allocator.keep_freed_memory() is False
    assert calls == [allocator._M_MMAP_THRESHOLD, allocator._M_TRIM_THRESHOLD]
