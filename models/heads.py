"""Medusa-style heads: extra guesses for the tokens after the next one.

Head k (0-based) reads the base model's last hidden state at position t and guesses the
token at t + k + 2 (the base model itself predicts t + 1). Each head is a stack of residual
blocks, x + SiLU(W x + b), each block with its own weights, followed by an unembedding:
either the base model's own (shared, so shipped heads stay a few MB) or one per head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadsConfig:
    num_heads: int = 4
    num_layers: int = 1
    hidden_size: int = 576
    vocab_size: int = 49152
    shared_unembedding: bool = True

    def __post_init__(self):
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(f"heads need num_heads >= 1 and num_layers >= 1, got {self.num_heads}, {self.num_layers}")


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # a fresh head starts as the identity: it guesses like the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """forward(hidden [N, H]) -> head hidden states [N, num_heads, H]; logits via `logits()`."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(config.hidden_size) for _ in range(config.num_layers)))
            for _ in range(config.num_heads))
        self.lm_heads = None if config.shared_unembedding else nn.ModuleList(
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([block(hidden) for block in self.blocks], dim=1)

    def logits(self, head_hidden: torch.Tensor, base_lm_head: nn.Linear) -> torch.Tensor:
        """head_hidden [N, num_heads, H] -> logits [N, num_heads, vocab].

        With the shared unembedding all heads of all rows go through one matmul, so its
        weights are read once.
        """
        if self.lm_heads is None:
            return base_lm_head(head_hidden)
        return torch.stack([head(head_hidden[:, k]) for k, head in enumerate(self.lm_heads)], dim=1)
