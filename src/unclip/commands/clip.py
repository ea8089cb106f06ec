"""``unclip classify``: zero-shot classification of images with a CLIP model (§3.1.2 of CLIP)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from unclip.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "classify", _classify)
    p.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, WebP, SVG)")
    p.add_argument("--labels", nargs="+", required=True, help="candidate labels")
    p.add_argument("--template", default="{}", help='caption template, e.g. "a photo of {}"')
    p.add_argument("--model", help="CLIP weights (default: the shipped pipeline's CLIP)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder, or the original CLIP vocabulary (bpe_simple_vocab_16e6.txt.gz)",
    )
    p.add_argument("--top", type=int, default=5, help="labels to print per image (default 5)")
    p.add_argument("--pad", action="store_true", help="pad images to a square instead of cropping")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")


def _default_model() -> Path:
    """The CLIP of the shipped default pipeline (emoji-small)."""
    from unclip.pipeline.loading import resolve_pipeline

    try:
        return resolve_pipeline("emoji-small")
    except FileNotFoundError:
        raise ValueError(
            "no default model is installed with this unclip; pass --model PATH"
        ) from None


def find_tokenizer(model_path: Path, tokenizer: str | None = None) -> Any:
    """The tokenizer for ``model_path``: ``tokenizer`` if given (a folder or a CLIP vocabulary
    file), else a ``tokenizer/`` folder in or beside the model folder, else the model
    folder's ``merges.txt`` (a transformers CLIP folder)."""
    from unclip.tokenizer import Tokenizer

    if tokenizer:
        t = Path(tokenizer)
        if t.is_dir():
            return Tokenizer.load(t)
        if t.is_file():
            return Tokenizer.from_clip_vocab(t)
        raise FileNotFoundError(f"{t}: no such tokenizer folder or vocabulary file")
    folder = model_path if model_path.is_dir() else model_path.parent
    for candidate in (folder / "tokenizer", folder.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return Tokenizer.load(candidate)
    if (folder / "merges.txt").is_file():
        return Tokenizer.from_clip_vocab(folder / "merges.txt")
    raise FileNotFoundError(
        f"{model_path}: no tokenizer/ folder or merges.txt next to the model; pass --tokenizer "
        "(a tokenizer folder or bpe_simple_vocab_16e6.txt.gz)"
    )


def _classify(args: argparse.Namespace) -> int:
    """zero-shot classify images against text labels with CLIP

    Score each image against the captions TEMPLATE.format(label) and print, per image, the most
    likely labels as tab-separated lines: image, label, probability. --model takes an unclip
    pipeline or CLIP folder, a transformers CLIPModel folder or an OpenAI CLIP state dict
    (.safetensors or .pt); the tokenizer is found next to it or given with --tokenizer.
    """
    import torch

    from unclip.clip import load_clip
    from unclip.data.transforms import load_image, prepare_image, to_tensor

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    model_path = Path(args.model) if args.model else _default_model()
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no such model file or folder")
    tokenizer = find_tokenizer(model_path, args.tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_clip(model_path, device=device)
    size = model.config.image_size
    images = []
    for name in args.images:
        if not Path(name).is_file():
            raise FileNotFoundError(f"{name}: no such image file")
        img = prepare_image(load_image(name), size, mode="pad" if args.pad else "crop")
        images.append(to_tensor(img))
    pixels = model.preprocess(torch.stack(images).to(device))  # [N, 3, S, S]
    probs = model.classify(pixels, args.labels, tokenizer, template=args.template).cpu()
    top = min(args.top, len(args.labels))
    for name, row in zip(args.images, probs, strict=True):
        values, indices = row.topk(top)
        for p, i in zip(values.tolist(), indices.tolist(), strict=True):
            sys.stdout.write(f"{name}\t{args.labels[i]}\t{p:.4f}\n")
    return 0
