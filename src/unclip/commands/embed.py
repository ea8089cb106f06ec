"""``unclip embed``: precompute CLIP image and caption embeddings for a data set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unclip.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "embed", run)
    p.add_argument("data", help="data set: shard folder, image folder or table")
    p.add_argument("--clip", required=True, help="CLIP model folder (e.g. runs/x/clip/final)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: CLIP_FOLDER/tokenizer)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", help="split named in the shard folder's manifest.jsonl")
    p.add_argument("--size", type=int, default=64, help="image side the data is read at")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per .npy shard")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """compute CLIP image and text embeddings of a data set as .npy shards

    Encode every image and caption of a data set with a CLIP model and write img_emb/, text_emb/
    and metadata/ shards aligned by key (the clip-retrieval layout). Resumable: whole shards
    already written are kept. The prior and the decoder train from these files.
    """
    import torch

    from unclip.clip.convert import load_clip
    from unclip.data.datasets import open_dataset
    from unclip.data.embeddings import compute_embeddings
    from unclip.tokenizer import Tokenizer
    from unclip.train import distributed
    from unclip.train.stages.common import clip_tokenizer_dir

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = distributed.setup(device)  # under torchrun each process embeds its own shards
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    model = load_clip(args.clip).to(device).eval()
    tok_dir = Path(args.tokenizer) if args.tokenizer else clip_tokenizer_dir(args.clip)
    tokenizer = Tokenizer.load(tok_dir)
    context = model.config.context_length
    data = open_dataset(args.data, size=args.size, split=args.split)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(model.preprocess(images.to(device)))

    def encode_text(captions) -> torch.Tensor:
        return model.encode_text(tokenizer(list(captions), context).to(device))

    written = compute_embeddings(
        data,
        encode_image,
        encode_text,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=not args.no_progress and dist.is_main,
        rank=dist.rank,
        world_size=dist.world_size,
        info={"clip": str(args.clip), "data": str(args.data), "split": args.split},
    )
    print(f"unclip: {len(data)} samples embedded into {args.out} ({written} new shards)",
          file=sys.stderr)  # fmt: skip
    if data.skips.total:
        print(data.skips.summary(), file=sys.stderr)
    return 0
