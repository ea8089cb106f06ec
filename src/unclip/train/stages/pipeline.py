"""``unclip train pipeline``: assemble trained stages into one pipeline folder.

Not a training run: it copies each stage's ``final/`` model folder (EMA weights only, cast to
fp16, no optimizer state) with its ``diffusion.json`` into ``--out`` and writes
``pipeline.json`` (see :func:`unclip.pipeline.assemble_pipeline`).
"""

from __future__ import annotations

import argparse
import sys

COMMON_TRAIN_ARGS = False
#: the stage folders given by one flag each (``--inpaint-decoder`` sets ``inpaint_decoder``)
STAGE_FLAGS = ("clip", "tokenizer", "prior", "decoder", "inpaint_decoder")


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Assemble trained stages into a pipeline folder that `unclip generate --pipeline DIR` "
        "and unclip.load_pipeline(DIR) use. Each stage is a model folder (a run's final/) or "
        "a training run folder (its final/ is used). Weights are the EMA weights where the "
        "stage has them, stored in fp16 (or --dtype); the stages are loaded together once to "
        "check that they fit (embedding widths, resolutions) before the folder is written."
    )
    p.add_argument("--clip", required=True, metavar="DIR", help="CLIP model folder (or run)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: CLIP/tokenizer)")
    p.add_argument("--prior", metavar="DIR",
                   help="prior folder (or run); without it the decoder gets the text embedding")  # fmt: skip
    p.add_argument("--decoder", required=True, metavar="DIR", help="decoder folder (or run)")
    p.add_argument("--inpaint-decoder", metavar="DIR",
                   help="decoder trained with inpainting inputs (else edits use RePaint)")  # fmt: skip
    p.add_argument("--upsampler", action="append", default=[], metavar="DIR",
                   help="upsampler folder (or run); repeat for a chain, lowest resolution first")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="pipeline folder to write")
    p.add_argument("--name", help="pipeline name recorded in pipeline.json and image metadata "
                   "(default: the --out folder's name)")  # fmt: skip
    p.add_argument("--sampling", metavar="JSON",
                   help="default sampling settings to record in pipeline.json: a file with any "
                   "of the keys prior, decoder, upsampler (steps, guidance, …; see "
                   "configs/emoji-small/sampling.json); unset keys keep the library defaults")  # fmt: skip
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage precision of the weights (default float16)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:

    from unclip.pipeline import assemble_pipeline
    from unclip.pipeline.config import SamplingConfig
    from unclip.pipeline.stages import DTYPES

    sampling = SamplingConfig.load(args.sampling) if args.sampling else None
    stages = {key: getattr(args, key) for key in STAGE_FLAGS}
    out = assemble_pipeline(
        args.out, **stages, upsamplers=args.upsampler, name=args.name, sampling=sampling,
        dtype=DTYPES[args.dtype], overwrite=args.overwrite,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"unclip: pipeline written to {out} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return 0
