"""A fixed CLIP to measure pipelines in: one feature space for pipelines built on different CLIPs.

A pipeline's own CLIP is the natural judge of its samples, but two pipelines with different CLIPs
then report numbers in two different spaces. :class:`ClipJudge` embeds captions and images the
way a pipeline does (onto white, centre square, the pipeline's output size, then the CLIP's own
preprocessing), with any CLIP folder, so ``unclip eval pipeline --judge`` can compare them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

__all__ = ["ClipJudge"]


class ClipJudge:
    """Embeds captions and images with the CLIP in ``clip_dir``: a CLIP folder holding
    ``tokenizer/`` (a CLIP run's ``final/``) or a pipeline folder (its ``clip/`` and ``tokenizer/``).

    ``image_size`` is the side images are brought to before CLIP's preprocessing: the judged
    pipeline's output size, so the judge sees what the pipeline's own CLIP would see.
    """

    def __init__(
        self, clip_dir: str | os.PathLike, image_size: int, device: str | torch.device = "cpu"
    ) -> None:
        from unclip.clip.text import TextEncoder

        self.text = TextEncoder(clip_dir, device)  # a missing tokenizer: FileNotFoundError
        self.clip = self.text.model
        self.image_size = image_size
        self.device = torch.device(device)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """N captions -> z_t [N, D] float32, L2-normalised."""
        return self.text(texts, self.device)[0].float()

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image]) -> Tensor:
        """N PIL images -> z_i [N, D] float32, L2-normalised."""
        from unclip.pipeline.images import prepare_image

        rows = []
        for start in range(0, len(images), 64):
            x = torch.cat(
                [prepare_image(img, self.image_size) for img in images[start : start + 64]]
            )
            z = self.clip.encode_image(self.clip.preprocess(x.to(self.device)))
            rows.append(z.float())
        return torch.cat(rows) if rows else torch.zeros(0)
