"""``.ci/where.py``, the CI log's line about the CPU, torch's kernels and unclip's dtype."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WHERE = Path(__file__).resolve().parents[1] / ".ci" / "where.py"


def test_where_reports_the_cpu_kernels_and_sampling_dtype() -> None:
    out = subprocess.run([sys.executable, str(WHERE)], capture_output=True, text=True,
                         check=True, timeout=120).stdout  # fmt: skip
    assert out.startswith("cpu: ") and "avx2=" in out
    assert "kernels " in out and "unclip samples in " in out, out  # not "not importable"
