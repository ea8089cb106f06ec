"""Nearest ×2 upsampling + 3×3 conv: interpolate + F.conv2d against upsample_conv3x3 (CPU).

usage: python benchmarks/upsample_conv.py [--repeat 20] [--threads 1] [--no-avx2]

CPU time (time.process_time) of one call, median of ``--repeat`` after warm-up, the two sides
alternating. ``fwd`` runs without autograd; ``fwd+bwd`` also takes the gradients of the input,
weight and bias. ``pre-w`` passes phase kernels computed once (as within a sampling run);
``packed`` runs both convolutions with weights reordered once for oneDNN (as
unclip.decoder.packed_conv does there). Rows for the native ISA run in this process, then the
float32 rows again in a child process with ATen, oneDNN and MKL capped at AVX2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from unclip.decoder.blocks import Conv3x3
from unclip.decoder.packed_conv import packed_convolutions, packing_available
from unclip.decoder.upsample_conv import phase_upsample_conv, phase_weights, upsample_conv3x3

SHAPES = [  # low-resolution input [N, C, H, W], output channels C'
    ((2, 96, 16, 16), 96),
    ((2, 96, 8, 8), 96),
    ((1, 64, 32, 32), 64),
    ((1, 64, 16, 16), 64),
    ((16, 96, 16, 16), 96),
    ((16, 96, 8, 8), 96),
]
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def reference(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), w, b, padding=1)


def medians(fns: list[Callable[[], object]], repeat: int, warmup: int = 3) -> list[float]:
    """Median CPU ms of each of ``fns``, called in turn ``repeat`` times after ``warmup``."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeat):
        for fn, ts in zip(fns, times, strict=True):
            t = time.process_time()
            fn()
            if i >= warmup:
                ts.append(time.process_time() - t)
    return [1e3 * statistics.median(ts) for ts in times]


def _conv(w: torch.Tensor, b: torch.Tensor) -> Conv3x3:
    """The UNet's convolution module with weights ``w``, ``b``."""
    conv = Conv3x3(w.shape[1], w.shape[0])
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv


def row(
    shape: tuple[int, int, int, int], co: int, cl: bool, isa: str, bf16: bool, repeat: int
) -> str:
    """One table row: the reference and upsample_conv3x3 at one size and layout."""
    torch.manual_seed(0)
    fmt = torch.channels_last if cl else torch.contiguous_format
    h = torch.randn(shape).contiguous(memory_format=fmt)
    w, b = torch.randn(co, shape[1], 3, 3) * 0.05, torch.randn(co)
    pw, pb = phase_weights(w, b)

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    conv = _conv(w, b)
    with torch.no_grad(), autocast(), packed_convolutions(conv):  # as sampling runs it
        fns = [lambda: reference(h, w, b), lambda: upsample_conv3x3(h, w, b)]
        fns.append(lambda: phase_upsample_conv(h, pw, pb))
        packed = None
        if not bf16 and packing_available(conv):  # (reference, phase) with packed weights
            up = F.interpolate
            packed = (lambda: conv(up(h, scale_factor=2.0)), lambda: conv.upsampled(h))
        fwd = medians(fns + list(packed or ()), repeat)
    hg, wg, bg = (t.clone().requires_grad_() for t in (h, w, b))
    grad = torch.randn(shape[0], co, 2 * shape[2], 2 * shape[3]).contiguous(memory_format=fmt)

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with autocast():
                y = fn(hg, wg, bg)
            return torch.autograd.grad(y, (hg, wg, bg), grad.to(y.dtype))

        return run

    bwd = medians([step(reference), step(upsample_conv3x3)], repeat)
    cells = [
        f"{list(shape)}→{co}",
        "CL" if cl else "NCHW",
        f"{isa} {'bf16' if bf16 else 'fp32'}",
        f"{fwd[0]:.3f}",
        f"{fwd[1]:.3f} ({fwd[0] / fwd[1]:.2f}×)",
        f"{fwd[2]:.3f} ({fwd[0] / fwd[2]:.2f}×)",
        f"{fwd[3]:.3f} / {fwd[4]:.3f} ({fwd[3] / fwd[4]:.2f}×)" if packed else "-",
        f"{bwd[0]:.3f}",
        f"{bwd[1]:.3f} ({bwd[0] / bwd[1]:.2f}×)",
    ]
    return "| " + " | ".join(cells) + " |"


def rows(repeat: int, isa: str, bf16: bool) -> None:
    """Print the rows of every size and layout (bf16: [2, 96, 16, 16] only)."""
    shapes = [((2, 96, 16, 16), 96)] if bf16 else SHAPES
    for shape, co in shapes:
        for cl in (True, False):
            print(row(shape, co, cl, isa, bf16, repeat), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20, help="timed calls per side (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-avx2", action="store_true", help="skip the rows capped at AVX2")
    p.add_argument("--child", choices=["avx2"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        rows(args.repeat, "avx2", bf16=False)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat}, CPU ms")
    print("| input→C' | layout | ISA dtype | ref fwd | new fwd | new fwd pre-w |", end="")
    print(" packed ref / new fwd | ref fwd+bwd | new fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    isa = torch.backends.cpu.get_cpu_capability().lower()
    rows(args.repeat, isa, bf16=False)
    if isa != "avx2" and not args.no_avx2:
        child = [sys.executable, __file__, "--child", "avx2"]
        child += ["--repeat", str(args.repeat), "--threads", str(args.threads)]
        subprocess.run(child, env={**os.environ, **AVX2}, check=True)
    rows(args.repeat, isa, bf16=True)


if __name__ == "__main__":
    main()
