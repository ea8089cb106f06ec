"""``unclip convert SOURCE --out OUT [--to unclip|diffusers] [--fp16]``: a diffusers unCLIP
folder (Karlo's layout, ``model_index.json``) to a plain unclip pipeline folder, which then
loads without converting, or an unclip pipeline back to diffusers' layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert", _convert)
    p.add_argument("source", metavar="SOURCE", help="the folder to convert")
    p.add_argument("--out", required=True, metavar="OUT", help="the folder to write")
    p.add_argument(
        "--to", choices=["unclip", "diffusers"], default="unclip", help="the format to write"
    )
    p.add_argument("--fp16", action="store_true", help="write float16 weights (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _convert(args: argparse.Namespace) -> int:
    """convert a diffusers unCLIP folder (Karlo) to an unclip pipeline folder, or back

    --to unclip (the default): SOURCE is a diffusers UnCLIPPipeline or
    UnCLIPImageVariationPipeline folder (model_index.json); OUT becomes an unclip pipeline
    folder that `unclip.load_pipeline`, `unclip generate --pipeline` and `unclip serve
    --pipeline` read without converting again. --to diffusers: SOURCE is a pipeline unclip
    loads (an unclip folder converted from diffusers, or a diffusers folder) and OUT a
    diffusers folder; pipelines diffusers cannot run the same way (unit embeddings, other
    architectures or samplers) are refused, saying why.
    """
    import torch

    from unclip.config import ConfigError, building_folder
    from unclip.pipeline.diffusers_folder import (
        convert_diffusers_folder,
        is_diffusers_folder,
        write_diffusers_folder,
        write_unclip_folder,
    )
    from unclip.pipeline.loading import load_pipeline

    dtype = torch.float16 if args.fp16 else torch.float32
    with building_folder(Path(args.out), args.overwrite) as tmp:
        if args.to == "unclip":
            if not is_diffusers_folder(args.source):
                raise ConfigError(
                    f"{args.source}: not a diffusers pipeline folder (no model_index.json)"
                )
            write_unclip_folder(convert_diffusers_folder(args.source), tmp, dtype)
            load_pipeline(tmp, device="cpu", dtype="float32")  # the written folder loads
        else:
            pipe = load_pipeline(args.source, device="cpu", dtype="float32")
            write_diffusers_folder(pipe, tmp, dtype)
    print(f"wrote {args.out} ({args.to}, {'float16' if args.fp16 else 'float32'})")
    return 0
