"""Winograd F(4×4, 3×3) against oneDNN's direct float32 convolution (CPU, no autograd).

usage: python benchmarks/winograd_conv.py [--repeat 30] [--no-avx2] [--config configs/emoji-small]

Wall time of one call, median of ``--repeat`` after warm-up, the two sides alternating, on
torch's threads. Layers: each 3×3 convolution at emoji-small's sizes, with its weights
reordered once for oneDNN (``unclip.decoder.packed_conv``, as a sampling run does) against
``unclip.decoder.winograd`` with its kernels transformed once (``uses`` says whether a
sampling run picks Winograd for it). Calls: one guided decoder call (batch 2, 8) and one
upsampler call (batch 1, 4) inside ``frozen_weights``, each side in its own process
(``UNCLIP_NATIVE=0`` turns the kernels off). Rows for the native ISA, then again in child
processes with ATen, oneDNN and MKL capped at AVX2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from unclip import native
from unclip.allocator import keep_freed_memory
from unclip.decoder import winograd
from unclip.decoder.packed_conv import packed_convolutions

LAYERS = [  # input [N, C, H, W], output channels
    ((2, 48, 32, 32), 48), ((2, 96, 32, 32), 96), ((2, 144, 32, 32), 48), ((2, 48, 16, 16), 96),
    ((2, 96, 16, 16), 96), ((2, 192, 16, 16), 96), ((2, 96, 8, 8), 96), ((2, 192, 8, 8), 96),
    ((1, 32, 64, 64), 32), ((1, 64, 32, 32), 64), ((1, 64, 16, 16), 64), ((1, 128, 32, 32), 64),
    ((8, 48, 32, 32), 48), ((8, 96, 8, 8), 96), ((4, 32, 64, 64), 32),
]  # fmt: skip
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def medians(fns: list[Callable[[], object]], repeat: int, warmup: int = 5) -> list[float]:
    """Median wall ms of each of ``fns``, called in turn ``repeat`` times after ``warmup``."""
    for f in fns:
        for _ in range(warmup):
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for f, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def layer_rows(repeat: int) -> list[str]:
    rows = []
    for shape, k in LAYERS:
        torch.manual_seed(0)
        conv = nn.Conv2d(shape[1], k, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        u = winograd.prepare(conv.weight, conv.bias)
        with torch.no_grad(), packed_convolutions(conv):
            onednn = conv.forward._onednn  # type: ignore[union-attr]
            direct = functools.partial(onednn, x, "conv", conv.weight, conv.bias, (1, 1))
            fast = functools.partial(winograd.winograd_conv, x, u)
            a, b = medians([direct, fast], repeat)
            uses = winograd.applies(x, conv)
        rows.append(
            f"| {list(shape)} → {k} | {a:.3f} | {b:.3f} | {b / a:.2f} | {'yes' if uses else 'no'} |"
        )
    return rows


def call_ms(config: str, repeat: int) -> dict[str, float]:
    """ms per decoder and upsampler call in this process (random weights)."""
    from unclip.commands.random_pipelines import randomize_zeros, stage_configs_from_dir
    from unclip.decoder.unet import UNet
    from unclip.decoder.upsampler import Upsampler

    cfgs = stage_configs_from_dir(config)
    torch.manual_seed(0)
    dec = randomize_zeros(UNet(cfgs.decoder).eval()).to(memory_format=torch.channels_last)
    up_cfg = cfgs.upsamplers[0][0]
    up = randomize_zeros(Upsampler(up_cfg).eval()).to(memory_format=torch.channels_last)
    low = cfgs.decoder.image_size
    out = {}
    for name, net, n, cond in [
        ("decoder", dec, 2, lambda n: {"image_emb": torch.randn(n, cfgs.decoder.clip_dim)}),
        ("decoder", dec, 8, lambda n: {"image_emb": torch.randn(n, cfgs.decoder.clip_dim)}),
        ("upsampler", up, 1, lambda n: {"low_res": torch.randn(n, 3, low, low)}),
        ("upsampler", up, 4, lambda n: {"low_res": torch.randn(n, 3, low, low)}),
    ]:
        s = net.config.image_size
        x = torch.randn(n, 3, s, s).contiguous(memory_format=torch.channels_last)
        t, kw = torch.full((n,), 500), cond(n)
        with torch.no_grad(), net.frozen_weights():
            out[f"{name}, batch {n}"] = medians([functools.partial(net, x, t, **kw)], repeat)[0]
    return out


def call_rows(config: str, repeat: int, env: dict[str, str]) -> list[str]:
    """Each side in its own process (the kernels are chosen once per process), twice, in turn."""
    runs: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
    for _ in range(2):
        for flag in runs:
            cmd = [
                sys.executable,
                __file__,
                "--calls-only",
                "--config",
                config,
                "--repeat",
                str(repeat),
            ]
            done = subprocess.run(cmd, env={**os.environ, **env, native.NATIVE_ENV: flag},
                                  capture_output=True, text=True, check=True)  # fmt: skip
            runs[flag].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for key in runs["0"][0]:
        a = min(r[key] for r in runs["0"])
        b = min(r[key] for r in runs["1"])
        rows.append(f"| {key} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    return rows


def report(args: argparse.Namespace, env: dict[str, str]) -> None:
    if env:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--repeat",
            str(args.repeat),
            "--config",
            args.config,
        ]
        subprocess.run(cmd, env={**os.environ, **env}, check=True)
        return
    keep_freed_memory()
    cap = torch.backends.cpu.get_cpu_capability()
    if not winograd.available():
        print(f"{cap}: no compiled kernels here ({native.unavailable_reason('winograd')})")
        return
    print(f"\n### {cap}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| layer | oneDNN ms | Winograd ms | ratio | sampling uses it |\n|---|---|---|---|---|")
    print("\n".join(layer_rows(args.repeat)))
    print("\n| call | oneDNN ms | with Winograd ms | ratio |\n|---|---|---|---|")
    print(
        "\n".join(
            call_rows(args.config, args.repeat, {k: os.environ[k] for k in AVX2 if k in os.environ})
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument(
        "--config", default="configs/emoji-small", help="run-config folder for the calls"
    )
    p.add_argument("--no-avx2", action="store_true", help="skip the rows capped at AVX2")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calls-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.calls_only:
        keep_freed_memory()
        print(json.dumps(call_ms(args.config, args.repeat)))
        return
    report(args, {})
    if not args.child and not args.no_avx2 and torch.backends.cpu.get_cpu_capability() != "AVX2":
        report(args, AVX2)


if __name__ == "__main__":
    main()
