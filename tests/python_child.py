"""Run Python code in a child process, for checks of process-wide state (imports, allocator
settings, start-up) that the test process itself has already changed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping


def run_python(code: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """stdout of ``python -c code args...`` (``env``: the child's whole environment, None:
    this one's); fails the test with the child's stderr when it exits non-zero."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
