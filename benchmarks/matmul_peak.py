"""Measured matrix-multiply peak of this machine (fp32 and bf16), the yardstick for MFU.

usage: python benchmarks/matmul_peak.py [--size 2048] [--repeat 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def peak_flops(dtype: torch.dtype, size: int = 2048, repeat: int = 10) -> float:
    """Best-of-``repeat`` FLOP/s of a ``size``² @ ``size``² matrix product in ``dtype``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "threads": torch.get_num_threads(),
        "fp32_gflops": peak_flops(torch.float32, args.size, args.repeat) / 1e9,
        "bf16_gflops": peak_flops(torch.bfloat16, args.size, args.repeat) / 1e9,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
