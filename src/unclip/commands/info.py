"""``unclip info PATH...``: parameter counts and forward FLOPs per image of model configs."""

from __future__ import annotations

import argparse
import json

from unclip.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "info", _info)
    p.add_argument("paths", nargs="+", metavar="PATH", help="model folder, run config or pipeline")
    p.add_argument("--json", action="store_true", help="print JSON (one list of models)")
    p.add_argument(
        "--stage",
        choices=["clip", "prior", "ar_prior", "decoder", "upsampler"],
        help="the stage of a run config, where its model section alone does not tell",
    )
    p.add_argument(
        "--text-len",
        type=int,
        help="caption tokens fed to a decoder (default: the CLIP context length where known, "
        "else 77)",
    )


def _info(args: argparse.Namespace) -> int:
    """print parameter counts and forward FLOPs per image of models or configs

    Build each model from its config (random weights, nothing is loaded), count its parameters
    and measure the FLOPs of one forward pass on one sample (CLIP: one image and one caption;
    prior: one embedding, for the AR prior one teacher-forced pass over all its codes; decoder
    and upsamplers: one image, per model call). PATH is a model folder (config.json), a
    training run config (configs/.../*.json) or a pipeline folder (pipeline.json: every stage).
    """
    from unclip.eval.model_stats import format_table, stats_for_path

    if args.text_len is not None and args.text_len < 1:
        raise ValueError(f"--text-len must be at least 1, got {args.text_len}")
    stats = []
    for path in args.paths:
        stats += stats_for_path(path, stage=args.stage, text_len=args.text_len)
    if args.json:
        print(json.dumps([s.to_dict() for s in stats], indent=2))
    else:
        print(format_table(stats))
    return 0
