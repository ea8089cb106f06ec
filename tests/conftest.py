import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from unclip.pipeline import UnclipPipeline

sys.path.insert(0, str(Path(__file__).parent))
# One torch thread for the whole suite: its models and tensors are tiny, so intra-op threads
# only add wake-up latency, and on a loaded machine a thread that waits for a busy core stalls
# the other (five of the model test files took 48 s with two threads and 19 s with one on a
# shared 2-core machine at load 6). One thread also keeps every result independent of the
# machine's core count. A test that wants more threads sets them itself and restores them.
torch.set_num_threads(1)
os.environ.setdefault("UNCLIP_THREADS", "1")  # and `unclip train` (--threads's default)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the module, whatever an earlier module left set (the suite's
    default is one already). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline folder (tests/tiny_pipeline.py), written once per module; a test
    that changes it works on a copy."""
    from tiny_pipeline import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny")


@pytest.fixture(scope="module")
def pipe(pipeline_dir: Path) -> "UnclipPipeline":
    """The tiny pipeline loaded on the CPU, once per module."""
    from unclip.pipeline import load_pipeline

    return load_pipeline(pipeline_dir, device="cpu")
