"""Subcommands of the ``unclip`` command, one module per family (see ``unclip.cli``)."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
#: the keys of ``unclip.diffusion.SAMPLERS``, without importing torch at start-up
SAMPLER_NAMES = ("ddim", "ddpm", "dpmpp_2m", "karlo")


def add_dtype_argument(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str = "--dtype",
    choices: tuple[str, ...] = DTYPE_CHOICES,
) -> None:
    """The sampling-precision option every pipeline command shares (default auto)."""
    p.add_argument(
        flag,
        choices=choices,
        default="auto",
        help="precision the sampling networks run in (default auto, as load_pipeline: "
        "bfloat16 on a CPU with AVX-512 BF16 or AMX or a GPU with bf16, else float32; "
        "CLIP and the sampler state stay float32; UNCLIP_DTYPE in the environment overrides auto)",
    )
