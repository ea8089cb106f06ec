"""``unclip bench``: how fast a pipeline samples and trains on this machine, and how much of
the machine's matrix-multiply peak the decoder uses.

For a pipeline (a shipped name such as ``emoji-small``, a pipeline folder, or random weights
built from a folder of run configs with ``--configs``) it measures, per stage (CLIP text
encoder, prior, decoder, each upsampler) and end to end:

- latency: one image, with the pipeline's sampling settings (steps, guidance, candidates);
- throughput: one batch of ``--batch`` images through the stage's sampler at once (what a
  batched pipeline could reach), and ``text_to_image(n=batch)`` end to end (what users get);
- the decoder's achieved FLOP/s: forward FLOPs per sample and model call
  (:mod:`unclip.eval.model_stats`) × the rows the sampler actually fed the network, over the
  measured time, against the measured fp32 and bf16 matrix-multiply peak (model FLOPs
  utilisation, MFU);
- training throughput: samples/s of a few optimizer steps (the stage's own loss, AdamW, bf16
  autocast as ``unclip train`` does) per stage on random data, and the decoder's training MFU
  (a training step counted as 3× the forward FLOPs).

Timings are medians of ``--repeat`` runs after a warm-up run; ratios against other tools are
the business of ``benchmarks/`` (taken side by side in one run).

What is measured lives in :mod:`unclip.commands.bench_measure`, the random-weight pipelines
in :mod:`unclip.commands.random_pipelines` and the Markdown output in
:mod:`unclip.commands.bench_report` (all three shared with the scripts in ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unclip.commands import add_command, add_dtype_argument, bench_train
from unclip.commands.bench_measure import bench_sampling, bench_training, matmul_peak
from unclip.commands.bench_report import format_markdown, machine_info, write_doc_section
from unclip.commands.random_pipelines import StageConfigs, random_pipeline, stage_configs_from_dir

if TYPE_CHECKING:
    import torch

    from unclip.pipeline import UnclipPipeline

DEFAULT_PIPELINE = "emoji-small"
#: ``unclip bench train STAGE``: the training-step profile (:mod:`unclip.commands.bench_train`)
TRAIN = "train"
#: where ``--configs`` falls back to when a pipeline name is not shipped (yet)
CONFIGS_ROOT = Path("configs")
#: the caption every benchmark encodes (its content does not change the cost)


def open_pipeline(
    name_or_path: str,
    *,
    configs: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[UnclipPipeline, StageConfigs | None, str]:
    """(pipeline, its stage configs when built from run configs, where the weights came from).

    ``configs``: build random weights from that folder of run configs. Otherwise load
    ``name_or_path``; a name that is not shipped yet but has ``configs/<name>/`` falls back
    to random weights from there (speed does not depend on the weights' values)."""
    from unclip.pipeline import load_pipeline

    if configs is None:
        try:
            pipe = load_pipeline(name_or_path, device=device, dtype=dtype)
            return pipe, None, str(pipe.path)
        except FileNotFoundError:
            fallback = CONFIGS_ROOT / name_or_path
            if "/" in name_or_path or not (fallback / "decoder.json").is_file():
                raise
            print(
                f"unclip bench: no pipeline {name_or_path!r} installed; using random weights "
                f"at the sizes of {fallback}/",
                file=sys.stderr,
            )
            configs = str(fallback)
    sc = stage_configs_from_dir(configs)
    pipe = random_pipeline(sc, device=device or "cpu", dtype=dtype)
    return pipe, sc, f"random weights from {configs}"


# ---------------------------------------------------------------------------------------------
# The command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bench", _bench)
    p.add_argument(
        "pipeline",
        nargs="?",
        default=DEFAULT_PIPELINE,
        help=f"pipeline name or folder (default: {DEFAULT_PIPELINE}; a name not installed "
        "falls back to random weights from configs/NAME/)",
    )
    p.add_argument("--configs", help="use random weights at the sizes of this run-config folder")
    p.add_argument("--batch", type=int,
                   help="images per batch (default 8); with train: the training batch "
                   "(default: the config's)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (default 3)")
    add_dtype_argument(p, choices=("auto", "float32", "bfloat16"))
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the sampling networks (warm-up runs absorb compiling)",
    )
    p.add_argument("--prior-steps", type=int, help="override the pipeline's prior steps")
    p.add_argument("--decoder-steps", type=int, help="override the pipeline's decoder steps")
    p.add_argument("--upsampler-steps", type=int, help="override the upsampler steps")
    p.add_argument("--train-steps", type=int, default=3,
                   help="timed optimizer steps per stage (default 3; 0 = skip training)")  # fmt: skip
    p.add_argument("--train-batch", type=int,
                   help="training batch for every stage (default: the run configs' batch "
                   "sizes where known, else 16)")  # fmt: skip
    p.add_argument("--train-fp32", action="store_true",
                   help="train in float32 (no bf16; with train STAGE too)")  # fmt: skip
    p.add_argument("--peak-fp32", type=float, help="fp32 matmul peak in GFLOP/s (skip measuring)")
    p.add_argument("--peak-bf16", type=float, help="bf16 matmul peak in GFLOP/s (skip measuring)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="a quick check: 2 steps per stage, batch 2, 1 repeat, 1 training step")  # fmt: skip
    p.add_argument("--doc", help="also write the tables as a section of this Markdown file")
    p.add_argument("--json", action="store_true", help="print JSON")
    bench_train.add_args(p)


def _bench(args: argparse.Namespace) -> int:
    """measure sampling latency/throughput per stage, decoder MFU and training speed

    Measure a pipeline on this machine: per stage (text encoder, prior, decoder, upsamplers) and
    end to end, the latency of one image and the throughput of a batch; the decoder's achieved
    FLOP/s against the measured fp32 and bf16 matrix-multiply peak (model FLOPs utilisation);
    and training samples/s per stage on random data. Times are medians after a warm-up run.
    `unclip bench train STAGE --config FILE` profiles one training step of a stage instead:
    where its time goes.
    """
    import torch

    from unclip.allocator import keep_freed_memory
    from unclip.precision import native_bf16

    keep_freed_memory()  # as the pipeline's runs and the trainer do
    if args.pipeline == TRAIN:
        return bench_train.run(args)
    if args.stage is not None:
        raise ValueError(f"unclip bench: STAGE {args.stage!r} goes with `unclip bench train`")
    args.batch = 8 if args.batch is None else args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("batch", "repeat", "train_batch", "prior_steps", "decoder_steps",
                "upsampler_steps"):  # fmt: skip
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps must be >= 0, got {args.train_steps}")
    if args.quick:
        args.batch, args.repeat = min(args.batch, 2), 1
        args.train_steps = min(args.train_steps, 1)
        args.train_batch = args.train_batch or 2
        for key in ("prior_steps", "decoder_steps", "upsampler_steps"):
            setattr(args, key, getattr(args, key) or 2)
    pipe, sc, source = open_pipeline(
        args.pipeline, configs=args.configs, device=args.device, dtype=args.dtype
    )
    args.dtype = str(pipe.dtype).removeprefix("torch.")  # what "auto" chose
    if args.compile:
        pipe.compile()
    settings = pipe.sampling_settings(
        prior_steps=args.prior_steps,
        decoder_steps=args.decoder_steps,
        upsampler_steps=args.upsampler_steps,
    )
    size, rep = (512, 2) if args.quick else (2048, 10)
    peaks = {
        "fp32": args.peak_fp32 or matmul_peak(torch.float32, size, rep) / 1e9,
        "bf16": args.peak_bf16 or matmul_peak(torch.bfloat16, size, rep) / 1e9,
    }
    result: dict[str, Any] = {
        "pipeline": pipe.name,
        "weights": source,
        "device": str(pipe.device),
        "dtype": args.dtype,
        "compiled": bool(args.compile),
        "quick": args.quick,
        "machine": machine_info(),
        "peak_gflops": peaks,
        "settings": settings.to_dict(),
        "sampling": bench_sampling(
            pipe, settings, batch=args.batch, repeat=args.repeat, peaks=peaks
        ),
    }
    if args.train_steps:
        known = sc.train_batch if sc is not None else {}
        batch = {k: args.train_batch or known.get(k, 16)
                 for k in ("clip", "prior", "decoder", "upsampler")}  # fmt: skip
        result["training"] = bench_training(
            pipe, batch=batch, steps=args.train_steps, bf16=not args.train_fp32,
            crop_size=sc.crop_size if sc is not None else 0, peaks=peaks,
        )  # fmt: skip
        bf16 = not args.train_fp32 and native_bf16(pipe.device)  # as autocast_context decides
        result["training_precision"] = "bf16 autocast" if bf16 else "float32"
    if args.doc:
        write_doc_section(args.doc, "unclip-bench", format_markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_markdown(result))
    return 0
