"""Medusa-style heads: extra guesses for the tokens after the next one.

Head k (0-based) reads the base model's last hidden state at position t and guesses the
token at t + k + 2 (the base model itself predicts t + 1). Each head is a stack of residual
blocks, x + SiLU(W x + b), each block with its own weights, followed by an unembedding:
either the base model's own (shared, so shipped heads stay a few MB) or one per head.

With `token_input` each head also reads the embedding of the token the base model itself
picked for t + 1 (known when drafting: it is the step's bonus token): head k adds
P_k e(x_{t+1}) to the hidden state before its blocks (P_k starts at zero, so a fresh head is
a plain Medusa head). Knowing the next token makes the guesses after it much easier: on
the default model's held-out data, head 1's top-1 went from 0.37 to 0.47 (docs/heads.md).
Medusa's reference format cannot express this input.

With `chained` (token-input heads only) the heads form a chain along the drafted path, as
EAGLE drafts with features and Hydra with sequentially dependent heads: head 0 reads the
hidden state and e(x_{t+1}) as above, and head k > 0 reads head k - 1's output and the
embedding of the token guessed at depth k (x_{t+k+1}, the node's own token in the tree):

    g_0 = blocks_0(h_t + P_0 e(x_{t+1})),   g_k = blocks_k(g_{k-1} + P_k e(x_{t+k+1}))

Head 0's output is trained towards the base model's state at t + 1 (the distillation loss
of models/head_trainer.py), so head 1 reads what head 0 read one token later, and every
head knows the whole path it extends. Drafting then runs head k once per tree node at
depth k that has children (`step`), instead of once per sequence.

Heads that share the unembedding may also carry a draft vocabulary: the few thousand token
ids they are trained to guess. Their top-k is then taken over those rows only, which on a
CPU makes drafting about 10x cheaper than a pass over all 49152 rows. Verification still
uses the full vocabulary, so this changes what is guessed, never what is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.packed_linear import PackedLinear, can_pack


@dataclass(frozen=True)
class HeadsConfig:
    num_heads: int = 4
    num_layers: int = 1
    hidden_size: int = 576
    vocab_size: int = 49152
    shared_unembedding: bool = True
    token_input: bool = False   # heads also read the embedding of the base model's next token
    chained: bool = False       # head k reads head k - 1's output and the path's token at depth k

    def __post_init__(self):
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(f"heads need num_heads >= 1 and num_layers >= 1, got {self.num_heads}, {self.num_layers}")
        if self.chained and not (self.token_input and self.shared_unembedding):
            raise ValueError("chained heads read the path's tokens and share the unembedding: "
                             "they need token_input and shared_unembedding")


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # a fresh head starts as the identity: it guesses like the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear.forward(x))


class MedusaHeads(nn.Module):
    """forward(hidden [N, H], next_embeds [N, H] | None, path_embeds [N, num_heads - 1, H] |
    None) -> head hidden states [N, num_heads, H]; logits via `logits()`, token guesses via
    `guesses()` (independent heads) or `step()` and `top_tokens()` (chained heads)."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(config.hidden_size) for _ in range(config.num_layers)))
            for _ in range(config.num_heads))
        self.lm_heads = None if config.shared_unembedding else nn.ModuleList(
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_heads))
        self.token_proj = None
        if config.token_input:
            self.token_proj = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size, bias=False)
                                            for _ in range(config.num_heads))
            for proj in self.token_proj:
                nn.init.zeros_(proj.weight)
        self.draft_vocab: torch.Tensor | None = None   # sorted token ids [V_d] (int64), shared unembedding only
        # (source weight, its draft-vocabulary rows, the vocabulary on its device)
        self._draft_unembedding: tuple[torch.Tensor, nn.Module, torch.Tensor] | None = None

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        if token_ids is not None:
            if self.lm_heads is not None:
                raise ValueError("a draft vocabulary needs heads that share the base model's unembedding")
            token_ids = torch.unique(token_ids.long().cpu())
            if token_ids.numel() == 0 or token_ids[0] < 0 or token_ids[-1] >= self.config.vocab_size:
                raise ValueError(f"draft vocabulary ids must lie in [0, {self.config.vocab_size})")
        self.draft_vocab, self._draft_unembedding = token_ids, None

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor | None = None,
                path_embeds: torch.Tensor | None = None, detach_chain: bool = False) -> torch.Tensor:
        """path_embeds (chained heads): the embeddings of the path's tokens after the next one,
        x_{t+2} .. x_{t+num_heads} (teacher forcing while training). detach_chain: head k's
        loss does not reach the heads before it (each head learns its own guess only)."""
        if self.token_proj is None:
            return torch.stack([self._blocks(k, hidden) for k in range(self.config.num_heads)], dim=1)
        if next_embeds is None:
            raise ValueError("these heads read the next token's embedding: pass next_embeds")
        if not self.config.chained:
            return torch.stack([self._blocks(k, hidden + proj.forward(next_embeds))
                                for k, proj in enumerate(self.token_proj)], dim=1)
        if path_embeds is None or path_embeds.shape[1] < self.config.num_heads - 1:
            raise ValueError("chained heads read the path: pass path_embeds [N, num_heads - 1, H]")
        outputs, state = [], hidden
        for k in range(self.config.num_heads):
            state = self.step(k, state.detach() if detach_chain and k else state,
                              next_embeds if k == 0 else path_embeds[:, k - 1])
            outputs.append(state)
        return torch.stack(outputs, dim=1)

    def step(self, k: int, state: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Chained heads: head k's output from its input state ([M, H]: the base model's
        hidden state for k = 0, head k - 1's output otherwise) and the embeddings [M, H] of
        the tokens at depth k of the path (the node being extended)."""
        return self._blocks(k, state + self.token_proj[k].forward(token_embeds))

    def _blocks(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Head k's residual blocks, called through .forward (nn.Module's hook machinery costs
        a few us a call, ~20 calls a draft; no hooks are registered on the heads)."""
        for block in self.blocks[k]:
            x = block.forward(x)
        return x

    def logits(self, head_hidden: torch.Tensor, base_lm_head: nn.Linear) -> torch.Tensor:
        """head_hidden [N, num_heads, H] -> logits [N, num_heads, vocab].

        With the shared unembedding all heads of all rows go through one matmul, so its
        weights are read once.
        """
        if self.lm_heads is None:
            return base_lm_head(head_hidden)
        return torch.stack([head(head_hidden[:, k]) for k, head in enumerate(self.lm_heads)], dim=1)

    def guesses(self, hidden: torch.Tensor, base_lm_head: nn.Linear, k: int,
                next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, H] (and the next tokens' embeddings [N, H] for token-input heads) ->
        each head's k most likely token ids [N, num_heads, k], best first."""
        if self.config.chained:
            raise ValueError("chained heads guess per tree node: use step() and top_tokens()")
        return self.top_tokens(self(hidden, next_embeds), base_lm_head, k)

    def top_tokens(self, head_hidden: torch.Tensor, base_lm_head: nn.Linear, k: int) -> torch.Tensor:
        """Head outputs [..., H] -> their k most likely token ids [..., k], best first (over the
        draft vocabulary when there is one)."""
        return self.top_guesses(head_hidden, base_lm_head, k)[1]

    def draft_unembedding(self, base_lm_head: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
        """(the base unembedding's rows of the draft vocabulary, the vocabulary on their
        device), built once per weight and vocabulary: no host copy a call (a CUDA graph
        replays the drafts)."""
        weight = base_lm_head.weight
        if self._draft_unembedding is None or self._draft_unembedding[0] is not weight:
            rows = nn.Linear(weight.shape[1], len(self.draft_vocab), bias=False, device=weight.device,
                             dtype=weight.dtype).requires_grad_(False)
            rows.weight.copy_(weight.detach()[self.draft_vocab.to(weight.device)])
            int8 = getattr(base_lm_head, "int8", None) is not None   # as the base model's unembedding runs
            self._draft_unembedding = (weight, PackedLinear(rows, int8=int8) if can_pack(weight.device, weight.dtype)
                                       else rows, self.draft_vocab.to(weight.device))
        return self._draft_unembedding[1:]

    def top_guesses(self, head_hidden: torch.Tensor, base_lm_head: nn.Linear, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head outputs [..., H] -> (probabilities, token ids) of their k most likely tokens
        [..., k], best first: the head's own softmax, over the draft vocabulary when there is
        one (the drafter's estimate of how likely each guess is right)."""
        if self.draft_vocab is None:
            logits = base_lm_head(head_hidden) if self.lm_heads is None else self.logits(head_hidden, base_lm_head)
            top = logits.float().softmax(-1).topk(k, dim=-1)
            return top.values, top.indices
        unembedding, vocab = self.draft_unembedding(base_lm_head)
        logits = unembedding(head_hidden).float()
        top = logits.softmax(-1).topk(min(k, len(vocab)), dim=-1)
        return top.values, vocab[top.indices]
