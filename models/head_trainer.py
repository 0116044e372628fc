"""Training and evaluating Medusa heads on cached hidden states (Medusa-1: frozen base).

The base model never runs here: the data are its final hidden states and its own tokens
(models/distill_data.py). Row i of an answer holds the hidden state that produced token i;
head k (0-based) at row i is trained to guess token i + k + 1, i.e. the token k + 1 steps
after the one the base model itself picks from that state.

Loss: the sum over heads of 0.8^k x cross-entropy. The shared 49152 x 576 unembedding
would dominate every step on a CPU, so training restricts the softmax to a *reduced
vocabulary*: the most frequent target tokens of the training split, enough to cover
`coverage` of all targets (at most `max_vocab`). Targets outside it are skipped by the
loss. Heads that share the unembedding keep that vocabulary as their draft vocabulary
(models/heads.py): the server guesses among those tokens only, and evaluation scores the
guesses exactly as the server makes them.

Distillation (`hidden_loss_weight` > 0): each head's output is also pulled towards the base
model's own hidden state at the position it guesses for (row i + k + 1, the state from
which the base picks that token), as a relative squared error. It is a dense signal that
needs no vocabulary at all, so it makes small self-distilled data sets go further.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.heads import HeadsConfig, MedusaHeads

LOSS_DECAY = 0.8
EVAL_TOP_K = 10


@dataclass(frozen=True)
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    shared_unembedding: bool = True
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    coverage: float = 0.98
    max_vocab: int = 4096
    hidden_loss_weight: float = 1.0
    token_input: bool = True   # heads read the next token's embedding too (models/heads.py)
    chained: bool = False      # head k reads head k - 1 and the path's token at depth k (models/heads.py)
    detach_chain: bool = False  # chained: head k's loss trains head k only, not the heads before it
    seed: int = 0


def head_targets(tokens: torch.Tensor, offsets: torch.Tensor, num_heads: int) -> torch.Tensor:
    """tokens [N], offsets [S + 1] -> targets [N, num_heads]: token i + k + 1 of the same
    answer, -1 where the answer ends first."""
    n = tokens.shape[0]
    rows = torch.arange(n)
    ends = torch.repeat_interleave(offsets[1:], offsets[1:] - offsets[:-1])   # [N]
    targets = torch.full((n, num_heads), -1, dtype=torch.long)
    for k in range(num_heads):
        ahead = rows + k + 1
        valid = ahead < ends
        targets[valid, k] = tokens[ahead[valid]]
    return targets


def reduced_vocabulary(targets: torch.Tensor, vocab_size: int, coverage: float, max_vocab: int) -> torch.Tensor:
    """The most frequent target ids covering `coverage` of targets (<= max_vocab), sorted."""
    counts = torch.bincount(targets[targets >= 0], minlength=vocab_size)
    order = counts.argsort(descending=True)
    cumulative = counts[order].cumsum(0).double() / max(1, int(counts.sum()))
    size = int((cumulative < coverage).sum()) + 1
    size = min(size, max_vocab, int((counts > 0).sum()))
    return order[:size].sort().values


class HeadTrainer:
    """Trains heads on (hidden, targets); resumable through `state_dict`."""

    def __init__(self, config: TrainConfig, base_lm_head: torch.Tensor, vocab_ids: torch.Tensor,
                 num_rows: int, device: torch.device | str = "cpu", base_embeddings: torch.Tensor | None = None):
        self.config = config
        self.device = torch.device(device)
        hidden_size = base_lm_head.shape[1]
        torch.manual_seed(config.seed)
        self.heads = MedusaHeads(HeadsConfig(config.num_heads, config.num_layers, hidden_size, base_lm_head.shape[0],
                                             config.shared_unembedding, config.token_input,
                                             config.chained)).to(self.device)
        if config.token_input and base_embeddings is None:
            raise ValueError("token-input heads train with the base model's token embeddings (base_embeddings)")
        self.embeddings = base_embeddings.float().to(self.device) if config.token_input else None  # [V, H]
        if self.heads.lm_heads is not None:  # own unembeddings start as copies of the base one
            for lm_head in self.heads.lm_heads:
                lm_head.weight.data.copy_(base_lm_head)
        self.vocab_ids = vocab_ids.to(self.device)
        if self.heads.lm_heads is None:  # they will guess among the tokens they were trained on
            self.heads.set_draft_vocab(vocab_ids)
        self.reduced_lm_head = base_lm_head[vocab_ids].float().to(self.device)   # [V_r, H]
        self.to_reduced = torch.full((base_lm_head.shape[0],), -1, dtype=torch.long, device=self.device)
        self.to_reduced[self.vocab_ids] = torch.arange(len(vocab_ids), device=self.device)
        self.weights = torch.tensor([LOSS_DECAY ** k for k in range(config.num_heads)], device=self.device)
        self.steps_per_epoch = max(1, num_rows // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        params = [p for p in self.heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = max(1, int(config.warmup_fraction * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(
            (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / self.total_steps)))))
        self.step = 0

    def reduced_logits(self, head_hidden: torch.Tensor) -> torch.Tensor:
        """head_hidden [B, num_heads, H] -> logits over the reduced vocabulary [B, num_heads, V_r]."""
        if self.heads.lm_heads is None:
            return head_hidden @ self.reduced_lm_head.T
        return torch.stack([head_hidden[:, k] @ lm.weight[self.vocab_ids].T
                            for k, lm in enumerate(self.heads.lm_heads)], dim=1)

    def next_embeds(self, next_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The embeddings token-input heads read ([B] token ids -> [B, H]); None for plain heads."""
        if self.embeddings is None:
            return None
        if next_tokens is None:
            raise ValueError("token-input heads need the next tokens (the base model's own picks)")
        return self.embeddings[next_tokens.long().to(self.device)]

    def path_embeds(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Chained heads read the true path (teacher forcing): head k > 0 reads token i + k,
        which is head k - 1's target. [B, K] targets -> [B, K - 1, H]; None for other heads."""
        if not self.config.chained:
            return None
        return self.embeddings[targets[:, :-1].clamp(min=0).to(self.device)]

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, future: torch.Tensor | None = None,
             next_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, H] float, targets [B, K] full-vocab ids (-1 = none), future [B, K, H] the
        base model's hidden states at the guessed positions, next_tokens [B] the token the base
        model picked from each row -> (loss, per-head CE [K])."""
        head_hidden = self.heads(hidden, self.next_embeds(next_tokens), self.path_embeds(targets),
                                 detach_chain=self.config.detach_chain)
        logits = self.reduced_logits(head_hidden)
        reduced = torch.where(targets >= 0, self.to_reduced[targets.clamp(min=0)], -1)
        per_head = torch.stack([F.cross_entropy(logits[:, k], reduced[:, k], ignore_index=-1)
                                if bool((reduced[:, k] >= 0).any()) else logits.new_zeros(())
                                for k in range(logits.shape[1])])
        loss = (per_head * self.weights).sum()
        if future is not None and self.config.hidden_loss_weight > 0:
            valid = (targets >= 0).float()                                            # [B, K]
            error = (head_hidden - future).pow(2).mean(-1) / future.pow(2).mean(-1).clamp(min=1e-6)
            per_head_error = (error * valid).sum(0) / valid.sum(0).clamp(min=1)       # [K]
            loss = loss + self.config.hidden_loss_weight * (per_head_error * self.weights).sum()
        return loss, per_head.detach()

    def batch_order(self, epoch: int, num_rows: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.randperm(num_rows, generator=generator)

    def train(self, hidden: torch.Tensor, targets: torch.Tensor, next_tokens: torch.Tensor | None = None,
              save=None, save_every: int = 100, max_steps: int | None = None) -> list[float]:
        """Run from self.step to the end (or max_steps more); returns the losses seen."""
        self.heads.train()
        losses = []
        stop = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train heads", unit="step")
        order, order_epoch = None, -1
        while self.step < stop:
            epoch, within = divmod(self.step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.batch_order(epoch, hidden.shape[0]), epoch
            rows = order[within * self.config.batch_size:(within + 1) * self.config.batch_size]
            ahead = (rows[:, None] + torch.arange(1, targets.shape[1] + 1)).clamp(max=hidden.shape[0] - 1)
            loss, per_head = self.loss(hidden[rows].to(self.device).float(), targets[rows].to(self.device),
                                       hidden[ahead].to(self.device).float(),
                                       None if next_tokens is None else next_tokens[rows])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", head1=f"{float(per_head[0]):.3f}")
            if save and (self.step % save_every == 0 or self.step == stop):
                save(self)
        bar.close()
        self.heads.eval()
        return losses

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "step": self.step, "heads": self.heads.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "vocab_ids": self.vocab_ids.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config):
            raise ValueError(f"the checkpoint was trained with {state['config']}, not {asdict(self.config)}; "
                             "use the same settings to resume, or another run directory")
        if not torch.equal(state["vocab_ids"], self.vocab_ids.cpu()):
            raise ValueError("the checkpoint's reduced vocabulary differs from this data's; use the same data")
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


@torch.inference_mode()
def evaluate(heads: MedusaHeads, base_lm_head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
             next_embeds: torch.Tensor | None = None, batch_size: int = 256, top_k: int = EVAL_TOP_K,
             token_embeddings: torch.Tensor | None = None) -> list[list[float]]:
    """Accuracy as the server drafts (over the heads' draft vocabulary when they have one):
    [head][rank] = share of positions whose rank-r guess is right (top-5 = sum of ranks 0..4).
    Chained heads read the true path, so head k's accuracy is the chance its guess is right
    given a path the verification kept up to depth k (what a tree's chances multiply)."""
    num_heads = heads.config.num_heads
    hits = torch.zeros(num_heads, top_k, dtype=torch.long)
    for guesses, batch_targets in _guess_batches(heads, base_lm_head, hidden, targets, next_embeds, batch_size,
                                                 top_k, token_embeddings):
        hits += (guesses == batch_targets[:, :, None]).sum(0)                # [K, top_k]
    counts = (targets >= 0).sum(0)
    return [[int(hits[k, r]) / max(1, int(counts[k])) for r in range(top_k)] for k in range(num_heads)]


@torch.inference_mode()
def chain_length(heads: MedusaHeads, base_lm_head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                 next_embeds: torch.Tensor | None = None, batch_size: int = 256,
                 token_embeddings: torch.Tensor | None = None) -> float:
    """Tokens per step a chain of every head's top-1 guess would give (1 + the guesses kept in
    a row from head 0), averaged over the positions where all heads have a target: unlike
    per-head accuracies, comparable between independent and chained heads."""
    total, positions = 0, 0
    for guesses, batch_targets in _guess_batches(heads, base_lm_head, hidden, targets, next_embeds, batch_size, 1,
                                                 token_embeddings):
        full = (batch_targets >= 0).all(1)
        in_a_row = (guesses[:, :, 0] == batch_targets).long().cumprod(1).sum(1)   # [B]
        total += int((1 + in_a_row)[full].sum())
        positions += int(full.sum())
    return total / max(1, positions)


def _guess_batches(heads, base_lm_head, hidden, targets, next_embeds, batch_size, top_k, token_embeddings):
    """Yields (guesses [B, K, top_k], targets [B, K]) batch by batch, as the server guesses."""
    device = base_lm_head.weight.device
    for start in tqdm(range(0, hidden.shape[0], batch_size), desc="evaluate", unit="batch", leave=False):
        h = hidden[start:start + batch_size].to(device, base_lm_head.weight.dtype)
        e = None if next_embeds is None else next_embeds[start:start + batch_size].to(device, h.dtype)
        batch_targets = targets[start:start + batch_size]
        yield head_guesses(heads, base_lm_head, h, batch_targets, e, top_k, token_embeddings), batch_targets

def head_guesses(heads: MedusaHeads, base_lm_head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                 next_embeds: torch.Tensor | None, top_k: int, token_embeddings: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Each head's top_k guesses [B, K, top_k] (on the CPU); chained heads along the true path
    (targets [B, K]), embedded with `token_embeddings` [V, H]."""
    if not heads.config.chained:
        return heads.guesses(hidden, base_lm_head, top_k, next_embeds).cpu()
    if token_embeddings is None:
        raise ValueError("chained heads read the path: pass the base model's token embeddings")
    path = token_embeddings[targets[:, :-1].clamp(min=0).to(token_embeddings.device)].to(hidden.dtype)
    return heads.top_tokens(heads(hidden, next_embeds, path), base_lm_head, top_k).cpu()
