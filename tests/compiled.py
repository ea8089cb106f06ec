"""``compiled``: the mark of tests that need unclip's C kernels built (Linux and a C compiler,
as unclip.native looks for it)."""

from __future__ import annotations

import sys

import pytest

from unclip import native

compiled = pytest.mark.skipif(
    not sys.platform.startswith("linux") or native.compiler() is None,
    reason="unclip's C kernels are built on Linux with a C compiler ($CC or cc)",
)
