"""The package's C kernels, compiled on first use with the machine's C compiler.

:func:`load` builds ``unclip/native/<name>.c`` into a shared library under
``$XDG_CACHE_HOME/unclip/native`` (default ``~/.cache/unclip/native``), named by a hash of the
source, the compiler and its flags (a compile takes well under a second, once per machine and
source), and loads it with ctypes. The flags follow the CPU kernels torch chose
(``torch.backends.cpu.get_cpu_capability()``): AVX-512 or AVX2 vectors where torch runs them,
else the compiler's defaults, so ``ATEN_CPU_CAPABILITY=avx2`` caps both alike. The kernels are
built with ``-fopenmp`` and share the process's OpenMP runtime with torch (the torch wheel's
libgomp has the system's soname), so ``torch.set_num_threads`` sets their threads too.

Off Linux, without a C compiler (``$CC``, else ``cc``), where the compile fails, or with
``UNCLIP_NATIVE=0``, :func:`load` returns None and callers run their PyTorch path; why is
logged (``logging``, this module's logger) and kept in :func:`unavailable_reason`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

#: set to "0" to run the PyTorch paths instead of the compiled kernels
NATIVE_ENV = "UNCLIP_NATIVE"
#: seconds a compile may take before the kernels are given up for this process
COMPILE_TIMEOUT_S = 120

_log = logging.getLogger(__name__)
_reasons: dict[str, str] = {}


def cpu_flags() -> tuple[list[str], int]:
    """(compiler flags, float32 lanes per vector) for the CPU kernels torch runs here."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw"], 16
    if capability == "AVX2":
        return ["-mavx2", "-mfma"], 8
    return [], 4


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$XDG_CACHE_HOME/unclip/native``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unclip" / "native"


def _build(name: str, source: bytes) -> Path:
    """The shared library of ``source`` in :func:`cache_dir`, compiled unless already there.
    Raises OSError or subprocess.SubprocessError when it cannot be built."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r} is not on PATH; set CC to one)")
    flags, lanes = cpu_flags()
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", f"-DLANES={lanes}", *flags]
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode()]))
    out = cache_dir() / f"{name}-{platform.machine()}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / out.name
        src.write_bytes(source)
        done = subprocess.run(
            [cc, *flags, str(src), "-o", str(lib)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(
                f"{cc} failed on {name}.c: {done.stderr.strip()[-2000:]}"
            )
        os.replace(lib, out)  # atomic: a concurrent build of the same key is harmless
    return out


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``unclip/native/<name>.c`` (built at the first call of the process if the
    cache lacks it), or None where it cannot be had (module docstring)."""
    if os.environ.get(NATIVE_ENV, "").strip() == "0":
        return _unavailable(name, f"{NATIVE_ENV}=0")
    if not sys.platform.startswith("linux"):
        return _unavailable(name, f"compiled kernels are built on Linux only, not {sys.platform}")
    try:
        source = resources.files(__package__).joinpath(f"{name}.c").read_bytes()
        return ctypes.CDLL(str(_build(name, source)))
    except (OSError, subprocess.SubprocessError) as e:
        return _unavailable(name, str(e))


def _unavailable(name: str, why: str) -> None:
    _reasons[name] = why
    _log.info("unclip.native: %s.c not used: %s", name, why)
    return None


def unavailable_reason(name: str) -> str | None:
    """Why :func:`load` returned None for ``name`` in this process (None if it has not, or
    has not been asked)."""
    return _reasons.get(name)
