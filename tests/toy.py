"""A tiny registered model and data set for tests of the hub and the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from unclip.config import Config
from unclip.hub import register_model_type


@dataclass
class ToyConfig(Config):
    type_name = "toy"
    dim: int = 8
    hidden: int = 32
    dropout: float = 0.1


class ToyModel(nn.Module):
    """x: [N, dim] -> [N, dim]; dropout and a noisy loss make the run depend on the RNG."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(config.dim, config.hidden),
            nn.LayerNorm(config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.dim),
        )
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


register_model_type("toy", ToyModel)


@dataclass
class ToyBlocksConfig(Config):
    type_name = "toy-blocks"
    dim: int = 8
    hidden: int = 31  # odd: FSDP splits the rows of a block's weights unevenly over 2 ranks
    blocks: int = 2


class ToyBlocksModel(nn.Module):
    """x: [N, dim] -> [N, dim] through residual MLP blocks in an ``nn.ModuleList`` (FSDP shards
    each block on its own) and a learned 0-d ``gain`` (a parameter FSDP cannot shard)."""

    config_class = ToyBlocksConfig

    def __init__(self, config: ToyBlocksConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(config.dim),
                nn.Linear(config.dim, config.hidden),
                nn.GELU(),
                nn.Linear(config.hidden, config.dim),
            )
            for _ in range(config.blocks)
        )
        self.out = nn.Linear(config.dim, config.dim)
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)  # [N, dim]
        return self.gain * self.out(x)


register_model_type("toy-blocks", ToyBlocksModel)


class ToyData(Dataset):
    """``n`` pairs (x, y) with y = sin(x @ A): [dim], [dim]."""

    def __init__(self, n: int = 96, dim: int = 8, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.sin(self.x @ torch.randn(dim, dim, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def toy_loss(model: nn.Module, batch):
    x, y = batch
    noisy = x + 0.1 * torch.randn_like(x)  # draws from the global RNG, as diffusion losses do
    loss = ((model(noisy).float() - y) ** 2).mean()
    return loss, {"mse": loss.item()}
