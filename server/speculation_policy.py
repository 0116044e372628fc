"""Load-adaptive speculation: how big a tree each sequence verifies this step.

A bigger tree is expected to yield more tokens per step but makes the step slower for every
sequence in the batch. With `E_i(n)` the tokens sequence i is expected to keep from a tree
of n nodes (from the heads' measured accuracies, scaled by how well its own guesses have
been accepted) and `t(T)` the measured time of a step running T tokens, we pick the n_i
that maximise generated tokens per second, sum_i E_i(n_i) / t(sum_i n_i + prefill tokens).
We search a price per token (lambda): at a given price each sequence independently takes
the tree size with the best E_i(n) - lambda * n, and we keep the price whose batch is
fastest. n = 1 (no speculation) is always a candidate, and trees are only taken when the
models say they beat it by MARGIN (3%): near the break-even point the estimates' errors
would otherwise make speculation a small loss.
"""
from __future__ import annotations

from server.cost_model import StepCostModel
from server.sequence import Sequence
from server.tree import Path, expected_accept_length, kept_by_tree

TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PINNED_DEFAULT = 16
SHADOW_SIZE = 16
MARGIN = 0.03
PRICES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35, 0.6, 1.0)


class SpeculationPolicy:
    def __init__(self, tree_paths: tuple[Path, ...], accuracies: list[list[float]],
                 cost_model: StepCostModel, max_nodes: int, fixed_size: int | None = None):
        self.tree_paths = tree_paths
        self.cost_model = cost_model
        limit = min(max_nodes, len(tree_paths) + 1)
        self.sizes = [n for n in TREE_SIZES if n <= limit] if fixed_size is None else [min(fixed_size, limit)]
        # tree size of seeded sampling requests: the fixed size, else a moderate default
        self.pinned_size = self.sizes[-1] if fixed_size is not None else max(
            n for n in self.sizes if n <= PINNED_DEFAULT)
        # expected gain (accepted drafted tokens) of each tree size under the prior accuracies
        self.gain = {n: expected_accept_length(list(tree_paths[: n - 1]), accuracies) - 1.0 for n in self.sizes}
        # plain steps are scored against this tree: what it would have kept (see `Sequence.spec`)
        shadow_size = min(SHADOW_SIZE, limit)
        self.shadow_paths = set(tree_paths[: shadow_size - 1])
        self.shadow_gain = expected_accept_length(list(tree_paths[: shadow_size - 1]), accuracies) - 1.0
        self.shadow_depth = max((len(p) for p in self.shadow_paths), default=0)

    def score_plain_steps(self, seq: Sequence) -> None:
        """Once the tokens after a plain step are known, score what the shadow tree would have
        kept from that step's draft; keeps the skill of a sequence that is not drafting current."""
        pending = seq.spec.plain_drafts
        while pending and (seq.num_tokens > pending[0][1] + self.shadow_depth or seq.is_finished):
            draft, root = pending.popleft()
            future = seq.token_ids[root + 1: root + 1 + self.shadow_depth]
            if len(future) == self.shadow_depth and self.shadow_gain > 0:
                seq.spec.record_shadow(kept_by_tree(self.shadow_paths, draft, future), self.shadow_gain)

    def prior_length(self, size: int) -> float:
        """Expected tokens per step from a tree of `size` nodes under the prior accuracies."""
        return 1.0 + self.gain.get(size, 0.0)

    def expected_length(self, seq: Sequence, size: int) -> float:
        return 1.0 + self.gain[size] * seq.spec.skill

    def choose(self, seqs: list[Sequence], other_tokens: int, token_limit: int) -> list[int]:
        """Tree size (nodes, root included) per sequence; 1 = plain decoding."""
        caps = [self._cap(seq) for seq in seqs]
        if len(self.sizes) == 1:
            sizes = self._fit([min(self.sizes[0], c) for c in caps], token_limit, seqs)
            return sizes
        best = self._fit([1] * len(seqs), token_limit, seqs)
        plain_rate = sum(self.expected_length(s, n) for s, n in zip(seqs, best)) / self.cost_model(
            sum(best) + other_tokens)
        best_rate = plain_rate * (1.0 + MARGIN)  # trees must win clearly: the models are estimates
        for price in PRICES:
            sizes = []
            for seq, cap in zip(seqs, caps):
                options = [n for n in self.sizes if n <= cap] or [1]
                sizes.append(max(options, key=lambda n: self.expected_length(seq, n) - price * n))
            sizes = self._fit(sizes, token_limit, seqs)
            tokens = sum(self.expected_length(s, n) for s, n in zip(seqs, sizes))
            rate = tokens / self.cost_model(sum(sizes) + other_tokens)
            if rate > best_rate * 1.001:  # prefer the cheaper batch when rates tie
                best, best_rate = sizes, rate
        return best

    def _cap(self, seq: Sequence) -> int:
        if seq.draft is None or not seq.params.speculate:
            return 1
        return max(1, min(self.sizes[-1], seq.remaining_tokens + 1))

    @staticmethod
    def is_pinned(seq: Sequence) -> bool:
        """Seeded sampling keeps one tree size whatever the load, so a seed always gives the
        same text: which tokens typical acceptance keeps depends on the tree."""
        return seq.params.seed is not None and not seq.params.is_greedy

    def _fit(self, sizes: list[int], token_limit: int, seqs: list[Sequence]) -> list[int]:
        """Pin seeded sampling requests, then shrink the biggest trees to fit the token limit."""
        sizes = [self.pinned_size if self.is_pinned(seq) and seq.draft is not None and seq.params.speculate
                 else size for seq, size in zip(seqs, sizes)]
        movable = [i for i, seq in enumerate(seqs) if not self.is_pinned(seq)]
        while sum(sizes) > token_limit and movable and max(sizes[i] for i in movable) > 1:
            i = max(movable, key=sizes.__getitem__)
            smaller = [n for n in self.sizes if n < sizes[i]]
            sizes[i] = smaller[-1] if smaller else 1
        return sizes
