"""unclip.native: the package's C kernels, compiled on first use, or None with a reason."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from compiled import compiled
from unclip import native

SOURCE = b"int answer(void) { return 42; }\n"


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test builds into its own cache and forgets this process's loads after it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    native.load.cache_clear()
    yield
    native.load.cache_clear()


@compiled
def test_a_source_is_built_once_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = native._build("answer", SOURCE)
    assert lib.parent == native.cache_dir() and lib.suffix == ".so"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert native._build("answer", SOURCE) == lib
    import ctypes

    assert ctypes.CDLL(str(lib)).answer() == 42


@compiled
def test_another_source_or_cpu_is_another_library(monkeypatch: pytest.MonkeyPatch) -> None:
    first = native._build("answer", SOURCE)
    assert native._build("answer", SOURCE.replace(b"42", b"43")) != first
    monkeypatch.setattr(native, "cpu_flags", lambda: ([], 4))
    assert native._build("answer", SOURCE) != first


@compiled
def test_a_failed_compile_names_the_file_and_the_error() -> None:
    with pytest.raises(subprocess.SubprocessError, match=r"bad\.c.*error"):
        native._build("bad", b"this is not C\n")
    assert list(native.cache_dir().glob("*")) == []  # nothing half-built is left


def test_no_compiler_is_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.sys, "platform", "linux")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native.load("winograd") is None
    assert "no-such-compiler-here" in native.unavailable_reason("winograd")


def test_the_environment_variable_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.load("winograd") is None
    assert native.NATIVE_ENV in native.unavailable_reason("winograd")


def test_nothing_is_built_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.sys, "platform", "darwin")
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("built off Linux"))
    assert native.load("winograd") is None
    assert "darwin" in native.unavailable_reason("winograd")


@compiled
def test_the_package_kernels_load() -> None:
    lib = native.load("winograd")
    assert lib is not None and hasattr(lib, "winograd_input")
    assert native.load("winograd") is lib  # once per process
    assert native.unavailable_reason("winograd") is None


@pytest.mark.parametrize(
    ("capability", "flag", "lanes"),
    [("AVX512", "-mavx512f", 16), ("AVX2", "-mavx2", 8), ("DEFAULT", None, 4)],
)
def test_the_flags_follow_torchs_cpu_kernels(
    monkeypatch: pytest.MonkeyPatch, capability: str, flag: str | None, lanes: int
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    flags, got = native.cpu_flags()
    assert got == lanes
    assert (flag in flags) if flag else flags == []


@compiled
def test_a_compiler_with_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "cc -O1")  # as ccache or a wrapper would be given
    assert native.compiler() == ["cc", "-O1"]
    assert native._build("answer", SOURCE).exists()


@compiled
def test_an_unwritable_cache_falls_back_to_the_temporary_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lib = native._build("answer", SOURCE)
    assert lib.parent.parent == tmp_path / "tmp"


@compiled
def test_a_broken_cached_library_is_built_again() -> None:
    path = native._build(
        "winograd", native.resources.files(native).joinpath("winograd.c").read_bytes()
    )
    path.write_bytes(b"not a shared library")
    lib = native.load("winograd")
    assert lib is not None and hasattr(lib, "winograd_input")


@compiled
def test_a_later_success_clears_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.load("winograd") is None
    native.load.cache_clear()
    monkeypatch.delenv(native.NATIVE_ENV)
    assert native.load("winograd") is not None
    assert native.unavailable_reason("winograd") is None
