import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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
