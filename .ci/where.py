"""Where a CI run is: the CPU flags that choose torch's kernels and unclip's sampling precision.

Printed at the start of a CI log, so that a result that depends on the CPU (AVX2 and AVX-512
kernels round differently; bf16 is used only where the CPU has it) can be traced. Never fails
on a missing flag or a missing /proc/cpuinfo.
"""

import os
import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "UNCLIP_DTYPE",
       "OMP_NUM_THREADS")  # fmt: skip

flags: set[str] = set()
try:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
except OSError:
    pass
cpu = " ".join(f"{x}={'yes' if x in flags else 'no'}" for x in FLAGS) if flags else "flags unknown"
print(f"cpu: {platform.machine()}, {os.cpu_count()} cores; {cpu}")
try:
    import torch

    from unclip.pipeline.stages import default_dtype

    try:
        dtype = str(default_dtype(torch.device("cpu"))).removeprefix("torch.")
    except ValueError as e:
        dtype = f"? ({e})"
    print(f"torch {torch.__version__}: kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; unclip samples in {dtype} (auto)")  # fmt: skip
except Exception as e:  # a report, never a failure
    print(f"torch/unclip: not importable ({type(e).__name__}: {e})")
print("env: " + (" ".join(f"{k}={os.environ[k]}" for k in ENV if k in os.environ) or "-"))
