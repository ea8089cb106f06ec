"""The package's C kernels, compiled on first use with the machine's C compiler.

:func:`load` builds ``unclip/native/<name>.c`` into a shared library under
``$XDG_CACHE_HOME/unclip/native`` (default ``~/.cache/unclip/native``), named by a hash of the
source, the compiler and its flags (a compile takes well under a second, once per machine and
source), and loads it with ctypes. The flags follow the CPU kernels torch chose
(``torch.backends.cpu.get_cpu_capability()``): AVX-512 or AVX2 vectors where torch runs them,
else the compiler's defaults, so ``ATEN_CPU_CAPABILITY=avx2`` caps both alike; :func:`lanes` is the vector width the
kernels are built for (their channel counts must be multiples of it). The kernels are built
with ``-fopenmp`` and share the process's OpenMP runtime with torch (the torch wheel's libgomp
has the system's soname); callers pass ``torch.get_num_threads()`` to each call.

Off Linux, without a C compiler (``$CC``, which may carry arguments, else ``cc``), where the
compile fails, or with
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
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


@functools.cache
def lanes() -> int:
    """float32 lanes per vector of the kernels built here: channel counts they take are
    multiples of it. Asked once per process (torch's CPU capability is fixed there, and the
    query costs tens of microseconds: too much for every kernel call)."""
    return cpu_flags()[1]


def readable(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x`` as it is: a dense float32 channels-last [N, C, H, W]
    tensor on the CPU whose C is a multiple of :func:`lanes`."""
    import torch

    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.ndim == 4
        and x.shape[1] % lanes() == 0
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def require_readable(x: torch.Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` unless :func:`readable` (the kernels would read
    memory that is not there, or read it wrongly)."""
    if not readable(x):
        raise ValueError(
            f"{name} must be float32 channels-last on the CPU with channels a multiple of "
            f"{lanes()}; got {x.dtype} {tuple(x.shape)} on {x.device} with strides {x.stride()}"
        )


def ptr(t: torch.Tensor | None) -> int | None:
    """The address a kernel gets for ``t`` (None for a missing optional tensor)."""
    return None if t is None else t.data_ptr()


def compiler() -> list[str] | None:
    """The C compiler's command (``$CC`` split as a shell would, else ``cc``), or None where it
    is not on PATH."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    return cc if cc and shutil.which(cc[0]) else None


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$XDG_CACHE_HOME/unclip/native`` (``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unclip" / "native"


def _writable_cache() -> Path:
    """:func:`cache_dir`, or a folder in the system's temporary folder where that cannot be
    made (a read-only or missing home)."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, RuntimeError):  # RuntimeError: no home directory to expand
        pass
    folder = Path(tempfile.gettempdir()) / f"unclip-native-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _build(name: str, source: bytes) -> Path:
    """The shared library of ``source`` in the cache, compiled unless already there. Raises
    OSError or subprocess.SubprocessError when it cannot be built."""
    cc = compiler()
    if cc is None:
        raise OSError(f"no C compiler ({os.environ.get('CC') or 'cc'!r} is not on PATH; set CC)")
    flags, width = cpu_flags()
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", f"-DLANES={width}", *flags]
    key = hashlib.sha256(b"\0".join([source, " ".join(cc + flags).encode()]))
    out = _writable_cache() / f"{name}-{platform.machine()}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / f"{name}.c", Path(tmp) / out.name
        src.write_bytes(source)
        done = subprocess.run(
            [*cc, *flags, str(src), "-o", str(lib)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(
                f"{cc[0]} failed on {name}.c: {done.stderr.strip()[-2000:]}"
            )
        os.replace(lib, out)  # atomic: a concurrent build of the same key is harmless
    return out


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``unclip/native/<name>.c`` (built at the first call of the process if the
    cache lacks it, and again if the cached file does not load), or None where it cannot be
    had (module docstring)."""
    if os.environ.get(NATIVE_ENV, "").strip() == "0":
        return _unavailable(name, f"{NATIVE_ENV}=0")
    if not sys.platform.startswith("linux"):
        return _unavailable(name, f"compiled kernels are built on Linux only, not {sys.platform}")
    try:
        source = resources.files(__package__).joinpath(f"{name}.c").read_bytes()
        path = _build(name, source)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a truncated or foreign file under the name: build it again
            path.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build(name, source)))
    except (OSError, subprocess.SubprocessError) as e:
        return _unavailable(name, str(e))
    _reasons.pop(name, None)
    return lib


def _unavailable(name: str, why: str) -> None:
    _reasons[name] = why
    _log.info("unclip.native: %s.c not used: %s", name, why)
    return None


def threads() -> int:
    """The thread count to pass a kernel: torch's intra-op count (OpenMP's own count is per
    calling thread, so a thread torch has not run in would otherwise use every core)."""
    import torch

    return torch.get_num_threads()


def unavailable_reason(name: str) -> str | None:
    """Why :func:`load` returned None for ``name`` in this process (None if it has not, or
    has not been asked)."""
    return _reasons.get(name)
