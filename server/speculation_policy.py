"""Load-adaptive speculation: how big a tree each sequence verifies this step.

A bigger tree is expected to yield more tokens per step but makes the step slower for every
sequence in the batch. With `E_i(n)` the tokens sequence i is expected to keep from a tree
of n nodes (from the heads' measured accuracies, scaled by how well its own guesses have
been accepted) and `t` the step-time model (server/cost_model.py: tokens, keys read,
trees, drafting sequences), we pick the n_i that maximise generated tokens per second,
sum_i E_i(n_i) / t(step). We search a price per token (lambda): at a given price each
sequence independently takes the tree size with the best E_i(n) - lambda * n, and we keep
the price whose batch is fastest. n = 1 (no speculation) is always a candidate, and trees
are only taken when the models say they beat it by MARGIN (3%): near the break-even point
the estimates' errors would otherwise make speculation a small loss.

Drafting is part of a tree's cost: a tree verified in step k was drafted by the heads at the
end of step k - 1. So the plan is made as if every sequence had a draft; sequences planned
for a tree draft after this step (and decode plainly in this step if they have no draft
yet). A sequence planned for plain decoding drafts too if a tree would pay for it with
heads as good as measured (skill 1) and those extra drafts cost under HOPE_BUDGET of the
step (a small batch): its draft is then scored against the text that follows
(`score_plain_steps`), so its skill stays current and a cold streak does not end its
speculation. Otherwise (a busy batch) it drafts only every EXPLORE_EVERY steps, and
drafting stops costing time.

Once the sizes are set, a context-lookup chain (server/lookup.py) joins a sequence's tree,
or its plain decode, when the tokens that sequence's chains have been keeping
(`lookup_gain`) raise the step's tokens per second at the step's cost; chains left out are
scored once the text after them is known (`score_dropped_lookups`), like plain steps' drafts.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from server.cost_model import StepCostModel
from server.sequence import Sequence
from server.tree import Path, expected_accept_length, kept_by_tree

TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PINNED_DEFAULT = 16
SHADOW_SIZE = 16
MARGIN = 0.03
EXPLORE_EVERY = 16  # a sequence that decodes plainly still drafts every this many steps
HOPE_BUDGET = 0.05  # share of a step that drafting "in case the skill is better" may cost
PRICES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35, 0.6, 1.0)


@dataclass
class TreePlan:
    sizes: list[int]     # the heads' tree nodes per sequence this step (1 = plain decoding)
    drafts: list[int]    # tree nodes to draft after this step, for the next one (0: no draft)
    lookups: list[list[int]]  # a context-lookup chain added to each sequence's tree (server/lookup.py)


class SpeculationPolicy:
    def __init__(self, tree_paths: tuple[Path, ...], accuracies: list[list[float]],
                 cost_model: StepCostModel, max_nodes: int, fixed_size: int | None = None,
                 lookup_tokens: int = 0):
        self.tree_paths = tree_paths
        self.max_nodes = max_nodes
        self.lookup_tokens = lookup_tokens
        self.cost_model = cost_model
        self.fixed_size = fixed_size
        self.speculating = bool(tree_paths) and fixed_size != 1  # did the last plan have trees
        limit = min(max_nodes, len(tree_paths) + 1)
        self.sizes = [n for n in TREE_SIZES if n <= limit] if fixed_size is None else [min(fixed_size, limit)]
        # tree size of seeded sampling requests: the fixed size, else a moderate default
        self.pinned_size = self.sizes[-1] if fixed_size is not None else max(
            n for n in self.sizes if n <= PINNED_DEFAULT)
        # expected gain (accepted drafted tokens) of each tree size under the prior accuracies
        self.gain = {n: expected_accept_length(list(tree_paths[: n - 1]), accuracies) - 1.0 for n in self.sizes}
        self._gains = torch.tensor([self.gain[n] for n in self.sizes], dtype=torch.float64)
        # plain steps are scored against this tree: what it would have kept (see `Sequence.spec`)
        self.shadow_size = min(SHADOW_SIZE, limit)
        self.accuracies = accuracies
        self.shadow_gain: dict[int, float] = {}  # by the nodes a scored draft fills
        self.shadow_depth = max((len(p) for p in tree_paths[: self.shadow_size - 1]), default=0)

    def score_plain_steps(self, seq: Sequence) -> None:
        """Once the tokens after a plain step are known, score what the shadow tree would have
        kept from that step's draft; keeps the skill of a sequence that is not drafting current."""
        pending = seq.spec.plain_drafts
        while pending and (seq.num_tokens > pending[0][1] + self.shadow_depth or seq.is_finished):
            draft, root = pending.popleft()
            future = seq.token_ids[root + 1: root + 1 + self.shadow_depth]
            size = min(self.shadow_size, len(draft) + 1)
            if size not in self.shadow_gain:
                self.shadow_gain[size] = expected_accept_length(list(self.tree_paths[: size - 1]), self.accuracies) - 1
            if len(future) == self.shadow_depth and self.shadow_gain[size] > 0:
                seq.spec.record_shadow(kept_by_tree(self.tree_paths[: size - 1], draft, future), self.shadow_gain[size])

    @staticmethod
    def score_dropped_lookups(seq: Sequence) -> None:
        """Once the tokens after a step are known, score the lookup chain the policy left out
        of it, so that a sequence's lookup_gain stays current while its chains are not run."""
        pending = seq.spec.dropped_lookups
        while pending and (seq.num_tokens >= pending[0][1] + 1 + len(pending[0][0]) or seq.is_finished):
            chain, root = pending.popleft()
            future = seq.token_ids[root + 1: root + 1 + len(chain)]
            seq.spec.record_lookup(next((i for i, (a, b) in enumerate(zip(chain, future)) if a != b), len(future)))

    def prior_length(self, size: int) -> float:
        """Expected tokens per step from a tree of `size` nodes under the prior accuracies."""
        return 1.0 + self.gain.get(size, 0.0)

    def choose(self, seqs: list[Sequence], other_tokens: int, token_limit: int, other_keys: int = 0) -> TreePlan:
        """Tree size per sequence for this step (1 = plain decoding; a tree needs the draft
        made in the step before) and which sequences draft for the next step."""
        if not seqs:  # a new prompt will have the batch (nearly) to itself
            self.speculating = bool(self.tree_paths) and self.fixed_size != 1
            return TreePlan([], [], [])
        reach = [self._reach(seq) for seq in seqs]
        if len(self.sizes) == 1:
            plan = self._fit([min(self.sizes[0], r) for r in reach], token_limit, seqs)
        else:
            plan = self._best_plan(seqs, reach, other_tokens, token_limit, other_keys)
        self.speculating = any(n > 1 for n in plan)
        hopeful = plan
        if len(self.sizes) > 1 and any(n == 1 and seq.spec.skill < 1.0 for seq, n in zip(seqs, plan)):
            # would a tree pay if the heads guessed as well as measured? then keep drafting:
            # the draft is scored either way, and a cold streak must not end speculation;
            # but only while those drafts are cheap next to the step (a small batch)
            hopeful = self._best_plan(seqs, reach, other_tokens, token_limit, other_keys, optimistic=True)
            extra = sum(h > 1 and n == 1 for n, h in zip(plan, hopeful))
            drafting = sum(n > 1 for n in plan)
            step = self.cost_model(len(seqs) + other_tokens, other_keys + sum(q.num_cached_tokens for q in seqs))
            if self.cost_model.draft(drafting + extra) - self.cost_model.draft(drafting) > HOPE_BUDGET * step:
                hopeful = plan
        drafts = [self._grown(n) if n > 1 else h if h > 1 else self.shadow_size if (
                      r > 1 and self.fixed_size is None and seq.spec.steps % EXPLORE_EVERY == 0) else 0
                  for seq, n, h, r in zip(seqs, plan, hopeful, reach)]
        sizes = [self._drafted(n, seq.draft) for seq, n in zip(seqs, plan)]
        return TreePlan(sizes, drafts, self._lookups(seqs, sizes, token_limit, other_tokens, other_keys))

    def draft_after_prefill(self, seq: Sequence) -> int:
        """Tree nodes a prompt that completes now drafts for its first tree: some if the last
        plan had trees (seeded sampling always: its tree size never changes), else none."""
        if self._reach(seq) <= 1 or not (self.speculating or self.is_pinned(seq)):
            return 0
        return self.pinned_size if self.is_pinned(seq) else min(self.shadow_size, self.sizes[-1])

    def _grown(self, size: int) -> int:
        """Nodes to draft for a sequence verifying `size` now: the next size up, so that its
        tree can grow by one step (heads whose drafts cost by the node draft no more)."""
        bigger = [n for n in self.sizes if n > size]
        return bigger[0] if bigger else size

    def _lookups(self, seqs: list[Sequence], sizes: list[int], token_limit: int, other_tokens: int,
                 other_keys: int) -> list[list[int]]:
        """A lookup chain (server/lookup.py) per sequence, within the step's token limit. The
        adaptive policy adds a chain, to a tree or to a plain decode, when the tokens it
        expects the chain to keep (the sequence's running `lookup_gain`) raise the step's
        tokens per second; a fixed tree size always gets one (and plain decoding none);
        seeded sampling always does, like its tree size, so that a seed gives the same text."""
        room = token_limit - sum(sizes)
        num_tokens = sum(sizes) + other_tokens
        context = other_keys + sum(seq.num_cached_tokens for seq in seqs) + num_tokens
        expected = sum(self.prior_length(n) if n > 1 else 1.0 for n in sizes)
        lookups = []
        for seq, size in zip(seqs, sizes):
            chain = []
            longest = min(self.lookup_tokens, self.max_nodes - size, seq.remaining_tokens - 1)
            if not self.is_pinned(seq):
                longest = min(longest, room)
            if size > 1 or (self.fixed_size is None and seq.params.speculate):
                chain = seq.context_index.continuation(seq.token_ids, longest)
            if chain and self.fixed_size is None and not self.is_pinned(seq):
                before = expected / self.cost_model(num_tokens, context)
                after = (expected + seq.spec.lookup_gain) / self.cost_model(num_tokens + len(chain), context + len(chain))
                if after > before * (1.0 + MARGIN):
                    expected += seq.spec.lookup_gain
                    num_tokens, context = num_tokens + len(chain), context + len(chain)
                else:  # scored once the text after it is known
                    seq.spec.dropped_lookups.append((chain, seq.num_tokens - 1))
                    chain = []
            room -= len(chain)
            lookups.append(chain)
        return lookups

    @staticmethod
    def _drafted(size: int, draft: list[int] | None) -> int:
        """The planned size, shrunk to the tree the sequence's draft fills."""
        return 1 if draft is None else min(size, len(draft) + 1)

    def _best_plan(self, seqs: list[Sequence], reach: list[int], other_tokens: int, token_limit: int,
                   other_keys: int, optimistic: bool = False) -> list[int]:
        """The tree sizes (as if every sequence had a draft) with the most tokens per second;
        optimistic: as if no sequence's heads guessed worse than their measured accuracies."""
        context = other_keys + sum(seq.num_cached_tokens for seq in seqs)
        skills = [max(seq.spec.skill, 1.0) if optimistic else seq.spec.skill for seq in seqs]

        def length(i: int, n: int) -> float:
            return 1.0 + self.gain[n] * skills[i]

        def rate(sizes: list[int]) -> float:
            tokens = sum(length(i, n) for i, n in enumerate(sizes))
            num_tokens = sum(sizes) + other_tokens
            trees = sum(n > 1 for n in sizes)
            return tokens / self.cost_model(num_tokens, context + num_tokens, trees, trees)

        best = self._fit([1] * len(seqs), token_limit, seqs)
        best_rate = rate(best) * (1.0 + MARGIN)  # trees must win clearly: the models are estimates
        # each sequence's size at each price of a node: the first size with the most
        # length - price * size, among those it can use (all prices and sequences at once:
        # in Python loops this took ~12 ms a step at 32 sequences)
        sizes_t = torch.tensor(self.sizes, dtype=torch.float64)
        score = (torch.tensor(skills, dtype=torch.float64)[None, :, None] * self._gains[None, None, :]
                 - torch.tensor(PRICES, dtype=torch.float64)[:, None, None] * sizes_t[None, None, :])
        score.masked_fill_(sizes_t[None, None, :] > torch.tensor(reach, dtype=torch.float64)[None, :, None],
                           float("-inf"))
        choices = score.argmax(-1).tolist()                                  # [prices][sequences]
        for per_seq in {tuple(c): None for c in choices}:  # neighbouring prices often agree
            sizes = self._fit([self.sizes[j] for j in per_seq], token_limit, seqs)
            candidate = rate(sizes)
            if candidate > best_rate * 1.001:  # prefer the cheaper batch when rates tie
                best, best_rate = sizes, candidate
        return best

    def _reach(self, seq: Sequence, pinned: bool = False) -> int:
        """The biggest tree this sequence could use, given a draft (pinned: whatever is left)."""
        if not self.tree_paths or not seq.params.speculate:
            return 1
        return self.sizes[-1] if pinned else max(1, min(self.sizes[-1], seq.remaining_tokens + 1))

    @staticmethod
    def is_pinned(seq: Sequence) -> bool:
        """Seeded sampling keeps one tree size whatever the load, so a seed always gives the
        same text: which tokens typical acceptance keeps depends on the tree."""
        return seq.params.seed is not None and not seq.params.is_greedy

    def _fit(self, sizes: list[int], token_limit: int, seqs: list[Sequence]) -> list[int]:
        """Pin seeded sampling requests, then shrink the biggest trees to fit the token limit."""
        sizes = [self.pinned_size if self.is_pinned(seq) and self._reach(seq, pinned=True) > 1 else size
                 for seq, size in zip(seqs, sizes)]
        total = sum(sizes)
        if total <= token_limit:
            return sizes
        biggest = [(-size, i) for i, (seq, size) in enumerate(zip(seqs, sizes)) if not self.is_pinned(seq) and size > 1]
        heapq.heapify(biggest)   # the biggest tree first, the earliest sequence among equals
        while total > token_limit and biggest:
            _, i = heapq.heappop(biggest)
            smaller = [n for n in self.sizes if n < sizes[i]]
            total -= sizes[i] - (smaller[-1] if smaller else 1)
            sizes[i] = smaller[-1] if smaller else 1
            if sizes[i] > 1:
                heapq.heappush(biggest, (-sizes[i], i))
        return sizes
