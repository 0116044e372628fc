"""Load-adaptive speculation: which candidate nodes each sequence verifies this step.

Every candidate node carries an estimate of the chance that it is kept: a heads' node the
heads' own (the product of their softmax probabilities along its path, server/drafter.py)
times the sequence's `skill`, a calibration learnt from what its trees really kept; a
context-lookup chain's i-th token (copied from the sequence's own text, server/lookup.py)
the sequence's running rate of chains whose first i + 1 tokens came true; a datastore
chain's (voted by the base model's earlier answers, server/datastore.py, when the
sequence's own text offers none) its vote confidence times the sequence's calibration of
such chains. A sequence's tree of n nodes is its n - 1 likeliest
nodes (ancestor-closed: a node is never likelier than its parent), so it is expected to
yield 1 + the sum of their chances, and this changes from step to step with what the heads
are sure of. With `t` the step-time model (server/cost_model.py: tokens, keys read, trees,
drafting sequences) we pick the nodes that maximise generated tokens per second,
sum_i E_i / t(step): at a price per node (lambda) every sequence takes the nodes whose
chance beats it, and we keep the price whose batch is fastest. No node at all (plain
decoding) is always a candidate, and trees are only taken when the models say they beat it
by MARGIN (3%): near the break-even point the estimates' errors would otherwise make
speculation a small loss.

Drafting is part of a tree's cost: a tree verified in step k was drafted by the heads at the
end of step k - 1. So the plan is made as if every sequence had a draft (one without gets
the prior chances of the heads' measured accuracies); sequences planned for a tree draft
after this step (and decode plainly in this step if they have no draft yet). A sequence
planned for plain decoding (its draft was unsure, or its skill is low) drafts too if a
tree would pay for it next step with a new draft as good as the measured accuracies and
heads as good as they usually are (`typical_skill`), while those drafts cost at most
HOPE_SHARE of the time such trees would save, discounted by the share of such drafts
that did lead to a tree (`hope_yield`; a small batch, where trees gain much): an
unsure draft then costs one plain step, not two, and a plain step's draft is scored
against the text that follows (`score_plain_steps`), so its skill stays current and a cold
streak does not end its speculation. Otherwise (a busy batch) it drafts only every
EXPLORE_EVERY steps, all such sequences in the same step (a draft call has a fixed cost),
and drafting stops costing time. Every lookup chain proposed is scored the same way once
the text after it is known (`score_lookups`), whether or not it was verified. `trust`
scales every plan's expectations by what the trees taken really kept against what their
plans expected (picking the best-looking estimates picks those that err high).

Planning itself takes time (`own_time`: ~1.7 ms a step for 32 sequences on the development
VM, against steps of ~50 ms with --int8-linear), which no plan saves back when trees gain
little. So when neither this step's plan nor the hoped-for one of the sequences planned
plain is expected to save more than that time, a batch of several sequences pauses for
PAUSE_STEPS steps: plain steps, no drafts, no lookups, then it plans again (a lone
sequence never pauses: its plans are cheap and its trees gain most).
"""
from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass
from itertools import accumulate

from server.cost_model import StepCostModel
from server.datastore import Datastore
from server.sequence import Sequence
from server.tree import Path, StepTree, best_nodes, children_by_token, kept_below, path_chance, step_tree

TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PINNED_DEFAULT = 16
SHADOW_SIZE = 16
MARGIN = 0.03
EXPLORE_EVERY = 16  # sequences that decode plainly still draft every this many steps
HOPE_SHARE = 0.5  # share of the time a hopeful tree would save that drafting for it may cost
HOPE_WEIGHT = 0.05  # of each hopeful draft in the moving average behind `hope_yield`
HOPE_FLOOR = 0.2    # hope_yield never drops below this: hopeful drafts are its only measure
TRUST_WEIGHT = 0.05  # of each verified tree in the moving averages behind `trust`
PAUSE_STEPS = 8      # plain steps, unplanned, when trees would save less than planning costs
OWN_WEIGHT = 0.1     # of each plan's own time in its moving average, `own_time`
FORCED_CHANCE = 0.95   # per token of a grammar-forced chain: another tokenization of its text may be picked


class Forced(list):
    """A chain's chances when its tokens are what the request's grammar forces next (server/
    structured.py): near-certain, whatever the sequence's record, and never scored."""


# a lookup chain's tokens and, for a datastore chain, their vote confidences (a forced
# chain: Forced chances; a chain copied from the sequence's own text: None)
Chain = tuple[list[int], "list[float] | None"]
PRICES = (0.0,) + tuple(0.001 * 1.4 ** k for k in range(21))  # a node's chance, 0.001 .. 0.84


@dataclass
class TreePlan:
    trees: list[StepTree]  # what each sequence verifies this step (a lone root: plain decoding)
    drafts: list[int]      # tree nodes to draft after this step, for the next one (0: no draft)

    @property
    def sizes(self) -> list[int]:
        """The heads' nodes of each tree, the root included (1 = no heads' guesses)."""
        return [len(t.head_paths) + 1 for t in self.trees]

    @property
    def lookups(self) -> list[list[int]]:
        return [list(t.lookup) for t in self.trees]


@dataclass
class _Candidates:
    """One sequence's candidate nodes, likeliest first: the heads' (tree-path indices and
    chances before the sequence's calibration `skill`) and its lookup chain's."""
    nodes: list[int]
    head_gain: list[float]    # head_gain[m]: the chances of the m likeliest heads' nodes, summed
    head_neg: list[float]     # minus each heads' node chance, ascending (to count those above a price)
    chain: list[int]
    chain_gain: list[float]
    chain_neg: list[float]
    chain_chances: list[float]
    extends_only: bool        # a datastore chain: only beside heads' nodes, never a tree of its own
    # depth_mass[m][k]: the chances of the m likeliest heads' nodes at depth k + 1, summed:
    # how likely those nodes already reach that depth
    depth_mass: list[tuple[float, ...]]

    def gain(self, nodes: int, skill: float) -> float:
        """What the heads' `nodes` likeliest nodes are expected to keep (a forced size may ask
        for more nodes than there are)."""
        return skill * self.head_gain[min(nodes, len(self.head_gain) - 1)]

    def chain_value(self, nodes: int, tokens: int, skill: float) -> float:
        """What the first `tokens` chain tokens add to the heads' `nodes` likeliest nodes. The
        two branches are alternatives: a step keeps whichever matches longer, so the chain's
        token at depth k counts only where the heads' nodes do not reach depth k already
        (taken as independent): P(chain reaches k) (1 - P(heads reach k)). Beyond the
        heads' depth the chain's chances count in full."""
        mass = self.depth_mass[min(nodes, len(self.depth_mass) - 1)]
        near = min(tokens, len(mass))
        value = self.chain_gain[tokens] - self.chain_gain[near]
        for k in range(near):
            value += self.chain_chances[k] * max(0.0, 1.0 - skill * mass[k])
        return value

    def heads_above(self, price: float, skill: float) -> int:
        return bisect.bisect_left(self.head_neg, -price / skill)

    def chain_above(self, price: float) -> int:
        return bisect.bisect_left(self.chain_neg, -price)


def _head_part(head_chances: list[float], depths: list[int]):
    """The heads' nodes' running gains, negated chances and depth masses (see _Candidates)."""
    mass = [0.0] * max(depths, default=0)
    depth_mass = [tuple(mass)]
    for chance, depth in zip(head_chances, depths):
        mass[depth - 1] += chance
        depth_mass.append(tuple(mass))
    return [0.0] + list(accumulate(head_chances)), [-c for c in head_chances], depth_mass


def _candidates(nodes: list[int], head_chances: list[float], chain: list[int], chain_chances: list[float],
                depths: list[int], extends_only: bool = False, head_part=None):
    """depths: each heads' node's depth (1 = the root's child); head_part: _head_part of the
    heads' nodes when already known."""
    head_gain, head_neg, depth_mass = head_part or _head_part(head_chances, depths)
    return _Candidates(nodes, head_gain, head_neg, chain, [0.0] + list(accumulate(chain_chances)),
                       [-c for c in chain_chances], chain_chances, extends_only, depth_mass)


def chain_kept(chain: list[int], root: int, future: list[int], verdicts: dict) -> tuple[int, int]:
    """(tokens known, tokens kept) of a lookup chain after token `root`, given the text that
    followed and typical acceptance's verdicts on its tokens ((token index, token) ->
    acceptable; where there is none, the text decides). A verified tree would keep an
    acceptable token even where the sampled text went elsewhere; after such a token the
    chain's fate is unknown."""
    for i, (want, got) in enumerate(zip(chain, future)):
        acceptable = verdicts.get((root + 1 + i, want), want == got)
        if not acceptable:
            return len(future), i
        if want != got:
            return i + 1, i + 1
    return len(future), len(future)


class SpeculationPolicy:
    def __init__(self, tree_paths: tuple[Path, ...], accuracies: list[list[float]],
                 cost_model: StepCostModel, max_nodes: int, fixed_size: int | None = None,
                 lookup_tokens: int = 0, datastore: Datastore | None = None):
        self.tree_paths = tree_paths
        self.max_nodes = max_nodes
        self.lookup_tokens = lookup_tokens
        self.datastore = datastore  # chains for sequences whose own text offers none
        self.cost_model = cost_model
        self.fixed_size = fixed_size
        self.speculating = bool(tree_paths) and fixed_size != 1  # did the last plan have trees
        limit = min(max_nodes, len(tree_paths) + 1)
        self.sizes = [n for n in TREE_SIZES if n <= limit] if fixed_size is None else [min(fixed_size, limit)]
        # tree size of seeded sampling requests: the fixed size, else a moderate default
        self.pinned_size = self.sizes[-1] if fixed_size is not None else max(
            n for n in self.sizes if n <= PINNED_DEFAULT)
        # each path's chance under the measured accuracies: a sequence without a draft is
        # planned with these (the paths are expansion-ordered: likeliest first)
        self.prior_chances = [path_chance(path, accuracies) for path in tree_paths]
        self._prior_parts: dict[int, tuple] = {}   # reach -> _head_part of the prior's nodes
        # plain steps are scored against the tree of this size their draft would have made
        self.shadow_size = min(SHADOW_SIZE, limit)
        self.shadow_depth = max((len(p) for p in tree_paths), default=0)
        self.steps = 0  # plans made for decoding sequences
        # how well heads usually do against their own chances (the engine keeps it current):
        # what a sequence on a cold streak may hope to return to
        self.typical_skill = 1.0
        # what the trees taken kept over what the plans expected of them (record_tree): the
        # plan takes the sequences and nodes whose estimates look best, and so also those
        # whose estimates err high; every plan's expectations are scaled by this
        self.trust = 1.0
        self._planned = self._kept = 1.0
        # the share of hopeful drafts whose sequence verified a tree the step after: what the
        # hope is worth (in a busy batch most such drafts turn out unsure and go unverified)
        self.hope_yield = 1.0
        self.own_time = 0.0    # seconds a plan takes to make (a moving average)
        self.paused = 0        # plain steps left before the next plan
        self._hoped_saving = 0.0

    def record_tree(self, planned: float, kept: int) -> None:
        """A verified tree's heads' nodes: what the plan expected them to keep (their chances
        times the sequence's skill) and what they kept."""
        self._planned += TRUST_WEIGHT * (planned - self._planned)
        self._kept += TRUST_WEIGHT * (kept - self._kept)
        self.trust = min(1.5, max(0.3, self._kept / max(self._planned, 1e-3)))

    def score(self, seq: Sequence) -> None:
        """After a step's tokens are appended: score what waits for them."""
        self.score_plain_steps(seq)
        self.score_lookups(seq)
        verdicts = seq.spec.probe_verdicts
        if verdicts:   # forget what nothing pending can ask for any more
            shadows, chains = seq.spec.plain_drafts, seq.spec.pending_lookups
            first = 1 + min(shadows[0][0] if shadows else seq.num_tokens, chains[0][1] if chains else seq.num_tokens)
            for key in [k for k in verdicts if k[0] < first]:
                del verdicts[key]

    @staticmethod
    def record_verdicts(seq: Sequence, probes: tuple[int, ...], verdicts: list[bool]) -> None:
        """A step's verdicts on its probes, before its tokens are appended: about the token
        at index seq.num_tokens, the first the step adds."""
        seq.spec.probe_verdicts.update(zip(((seq.num_tokens, token) for token in probes), verdicts))

    def pend_shadow(self, seq: Sequence) -> None:
        """A sequence that verifies none of its draft this step: the tree it would have
        verified waits in `plain_drafts` (index of its root, the heads' chances of its nodes,
        its children by token) until score_plain_steps knows the text after it."""
        draft = seq.draft
        nodes = best_nodes(draft.chances, min(self.shadow_size - 1, len(draft)))
        expected = sum(draft.chances[j] for j in nodes)
        children = children_by_token(tuple(self.tree_paths[j] for j in nodes), [draft.tokens[j] for j in nodes])
        seq.spec.plain_drafts.append((seq.num_tokens - 1, expected, children))

    def score_plain_steps(self, seq: Sequence) -> None:
        """Once the tokens after a plain step are known, score what the shadow tree would have
        kept from that step's draft; keeps the skill of a sequence that is not drafting current."""
        pending, verdicts = seq.spec.plain_drafts, seq.spec.probe_verdicts
        while pending and (seq.num_tokens > pending[0][0] + self.shadow_depth or seq.is_finished):
            root, expected, children = pending.popleft()
            future = seq.token_ids[root + 1: root + 1 + self.shadow_depth]
            if len(future) == self.shadow_depth and expected > 0:
                kept = kept_below(children, future, lambda depth, token: verdicts.get((root + 1 + depth, token)))
                seq.spec.record_shadow(kept, expected)

    @staticmethod
    def score_lookups(seq: Sequence) -> None:
        """Once the tokens after a step are known, score the lookup chain proposed for it (as
        far as the text goes), so a sequence's chain chances stay current whether or not the
        policy verified its chains."""
        pending, verdicts = seq.spec.pending_lookups, seq.spec.probe_verdicts
        while pending and (seq.num_tokens >= pending[0][1] + 1 + len(pending[0][0]) or seq.is_finished):
            chain, root, confidences = pending.popleft()
            if isinstance(confidences, Forced):   # the grammar's, not a guess
                continue
            known, kept = chain_kept(chain, root, seq.token_ids[root + 1: root + 1 + len(chain)], verdicts)
            if confidences is None:
                seq.spec.record_lookup(known, kept)
            elif known:
                seq.spec.record_datastore(kept, sum(confidences[:known]))

    @staticmethod
    def probes(seq: Sequence) -> tuple[int, ...]:
        """Under typical acceptance, the tokens that the sequence's pending shadow trees and
        lookup chains offer next, where the text has followed them so far: the step tests
        them at its root, for score_plain_steps and score_lookups."""
        if seq.params.is_greedy or seq.params.acceptance != "typical":
            return ()
        index, tokens = seq.num_tokens, {}
        for root, _, children in seq.spec.plain_drafts:
            node = ()
            for token in seq.token_ids[root + 1: index]:
                node = children.get(node, {}).get(token)
                if node is None:
                    break
            else:
                tokens.update(dict.fromkeys(children.get(node, ())))
        for chain, root, confidences in seq.spec.pending_lookups:
            if isinstance(confidences, Forced):   # never scored: nothing to test
                continue
            i = index - root - 1
            if i < len(chain) and seq.token_ids[root + 1: index] == chain[:i]:
                tokens[chain[i]] = None
        return tuple(tokens)

    def choose(self, seqs: list[Sequence], other_tokens: int, token_limit: int, other_keys: int = 0) -> TreePlan:
        """What each sequence verifies this step (a tree needs the draft made in the step
        before) and which sequences draft for the next step. Called once per step: it also
        records what the step leaves unverified (the lookup chains, shadow trees) for scoring."""
        if not seqs:  # a new prompt will have the batch (nearly) to itself
            self.speculating = bool(self.tree_paths) and self.fixed_size != 1
            self.paused = 0
            return TreePlan([], [])
        if self.paused and any(self.is_pinned(seq) and self._reach(seq, pinned=True) > 1 for seq in seqs):
            self.paused = 0   # a seeded request keeps its tree size whatever the load
        if self.paused:   # trees gained less than planning costs: plain steps, no drafts
            self.paused -= 1
            self.speculating = False   # (nor do prompts that complete meanwhile)
            return self._plain(seqs)
        # nothing to plan: no heads and no lookups (--no-speculation), or plain decoding fixed
        # by the budget (seeded sampling too: its pinned size is the fixed one, and no chains)
        if (not self.tree_paths and not self.lookup_tokens) or self.fixed_size == 1:
            self.speculating = False
            return self._plain(seqs)
        started = time.perf_counter()
        reach = [self._reach(seq) for seq in seqs]
        chains = [self._chain(seq) for seq in seqs]
        for seq, (chain, confidences) in zip(seqs, chains):
            if chain:  # scored once the text after it is known, verified or not
                seq.spec.pending_lookups.append((chain, seq.num_tokens - 1, confidences))
        candidates = [self._candidates(seq, r, chain) for seq, r, chain in zip(seqs, reach, chains)]
        skills = [seq.spec.skill * self.trust for seq in seqs]
        pinned = [self.is_pinned(seq) and self._reach(seq, pinned=True) > 1 for seq in seqs]
        if self.fixed_size is not None:
            heads = self._fit([min(self.sizes[0], r) for r in reach], token_limit, seqs)
            forced = [(h, len(c.chain) if p else 0 if self.fixed_size == 1 else None)
                      for h, c, p in zip(heads, candidates, pinned)]
        else:
            forced = [(self.pinned_size, len(c.chain)) if p else (None, None) for c, p in zip(candidates, pinned)]
        heads, chain_lens, rate, plain_rate = self._best_plan(seqs, candidates, skills, forced, other_tokens,
                                                              token_limit, other_keys)
        self.speculating = any(n > 1 for n in heads)
        for seq, n in zip(seqs, heads):
            if seq.spec.hoping:
                seq.spec.hoping = False
                self.hope_yield = max(HOPE_FLOOR, self.hope_yield + HOPE_WEIGHT * ((n > 1) - self.hope_yield))
        drafts = self._next_drafts(seqs, reach, chains, heads, skills, forced, other_tokens, token_limit, other_keys)
        trees = [self._step_tree(seq, c, n, m) for seq, c, n, m in zip(seqs, candidates, heads, chain_lens)]
        self.own_time += OWN_WEIGHT * (time.perf_counter() - started - self.own_time)
        if self.fixed_size is None and len(seqs) > 1 and not any(self.is_pinned(seq) for seq in seqs):
            step = self._step_estimate(seqs, other_tokens, other_keys)
            saving = max(step * (rate / plain_rate - 1.0), self._hoped_saving)
            if saving < self.own_time:
                self.paused = PAUSE_STEPS
                if self.steps % EXPLORE_EVERY:   # no tree will use them; explorers' drafts get scored
                    drafts = [0] * len(seqs)
        return TreePlan(trees, drafts)

    def _plain(self, seqs: list[Sequence]) -> TreePlan:
        """Every sequence decodes one token (its tree is the root) and drafts nothing."""
        for seq in seqs:
            if seq.draft is not None:
                self.pend_shadow(seq)
        return TreePlan([step_tree(seq.token_ids[-1], probes=self.probes(seq)) for seq in seqs], [0] * len(seqs))

    def _step_estimate(self, seqs: list[Sequence], other_tokens: int, other_keys: int) -> float:
        """The model's time for a plain step of these sequences."""
        tokens = len(seqs) + other_tokens
        return self.cost_model(tokens, other_keys + sum(q.num_cached_tokens for q in seqs) + tokens)

    def _next_drafts(self, seqs: list[Sequence], reach: list[int], chains: list[Chain], heads: list[int],
                     skills: list[float], forced, other_tokens: int, token_limit: int, other_keys: int) -> list[int]:
        """Tree nodes each sequence drafts after this step. One that verifies a tree now drafts
        for the next size up. One that decodes plainly now (its draft was unsure, or its skill
        is low) plans its next step as if that had a draft as good as the measured accuracies,
        with heads as good as usual (`typical_skill`): the next draft is a new one, and a cold
        streak must not end speculation. It drafts if that plan has a tree for it, and the
        drafts cost at most HOPE_SHARE of what that plan expects to gain, times the share of
        such drafts that led to a tree (`hope_yield`): at most a small part of a busy step,
        where trees gain little; the others draft together every EXPLORE_EVERY steps, so
        their skill stays current."""
        grown = [self._grown(n) if n > 1 else 0 for n in heads]
        self.steps += 1
        self._hoped_saving = 0.0
        idle = [n == 1 and r > 1 for n, r in zip(heads, reach)]
        if self.fixed_size is not None or not any(idle):
            return grown
        prior = [self._candidates(seq, r, chain, prior=True) for seq, r, chain in zip(seqs, reach, chains)]
        hoped = [max(skill, self.typical_skill * self.trust) for skill in skills]
        next_heads, _, rate, _ = self._best_plan(seqs, prior, hoped, forced, other_tokens, token_limit, other_keys)
        extra = sum(i and h > 1 for i, h in zip(idle, next_heads))
        if extra:
            drafting = sum(n > 1 for n in heads)
            step = self._step_estimate(seqs, other_tokens, other_keys)
            gain = (rate * step / len(seqs) - 1.0) * step   # seconds a step saves if the hope comes true
            cost = self.cost_model.draft(drafting + extra) - self.cost_model.draft(drafting)
            self._hoped_saving = self.hope_yield * gain - cost
            if cost > HOPE_SHARE * self.hope_yield * gain:
                next_heads = heads
        for seq, i, h in zip(seqs, idle, next_heads):
            seq.spec.hoping = i and h > 1
        explore = self.steps % EXPLORE_EVERY == 0
        return [g if n > 1 else h if h > 1 else self.shadow_size if i and explore else 0
                for g, n, h, i in zip(grown, heads, next_heads, idle)]

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

    def _chain(self, seq: Sequence) -> Chain:
        """The sequence's lookup chain at its longest: the tokens its grammar forces next
        (structured outputs: a JSON schema's keys and punctuation), else copied from its own
        text (server/lookup.py; no confidences), else voted by the datastore (server/datastore.py)
        for a sequence that drafted for this step. Datastore chains extend the trees the
        policy already plans and start none of their own: under load, where most sequences
        decode plainly, a lookup per sequence and step (~0.2 ms) and the chain-only trees it
        proposed cost more than they kept (adaptive 0.92x plain at concurrency 16 with them,
        docs/benchmarks.md)."""
        if not self.lookup_tokens or self.fixed_size == 1 or not seq.params.speculate:
            return [], None
        longest = min(self.lookup_tokens, self.max_nodes - 1, seq.remaining_tokens - 1)
        if seq.grammar is not None:
            forced = seq.grammar.forced(longest)
            if forced:
                return forced, Forced(FORCED_CHANCE ** (k + 1) for k in range(len(forced)))
        chain = seq.context_index.continuation(seq.token_ids, longest)
        if chain or self.datastore is None or seq.draft is None:
            return chain, None
        return self.datastore.voted(seq.token_ids, longest)

    def _candidates(self, seq: Sequence, reach: int, lookup: Chain, prior: bool = False) -> _Candidates:
        """prior: plan with the measured accuracies' chances, whatever the sequence's draft."""
        head_part = None
        if seq.draft is not None and not prior:
            chances = seq.draft.chances
            nodes = sorted(range(len(chances)), key=lambda j: -chances[j])[: reach - 1]   # ties in path order
        else:  # planned as if it had a draft as good as the measured accuracies
            chances = self.prior_chances
            nodes = list(range(min(reach - 1, len(chances))))
            if reach not in self._prior_parts:   # the same for every sequence of this reach
                self._prior_parts[reach] = _head_part([chances[j] for j in nodes],
                                                      [len(self.tree_paths[j]) for j in nodes])
            head_part = self._prior_parts[reach]
        chain, confidences = lookup
        voted = confidences is not None and not isinstance(confidences, Forced)   # a datastore chain
        if confidences is None:
            chain_chances = list(accumulate((seq.spec.lookup_value(i) for i in range(len(chain))), min))
        elif voted:
            chain_chances = [min(1.0, seq.spec.datastore_calibration * c) for c in confidences]
        else:
            chain_chances = list(confidences)
        return _candidates(nodes, [chances[j] for j in nodes], chain, chain_chances,
                           [len(self.tree_paths[j]) for j in nodes], voted, head_part)

    def _step_tree(self, seq: Sequence, candidates: _Candidates, heads: int, chain: int) -> StepTree:
        """The tree of the sequence's `heads` - 1 likeliest drafted nodes (none without a
        draft) with the first `chain` tokens of its lookup chain merged in."""
        draft = seq.draft
        nodes = sorted(candidates.nodes[: heads - 1]) if draft is not None else []
        if draft is not None and not nodes:
            self.pend_shadow(seq)
        return step_tree(seq.token_ids[-1], tuple(self.tree_paths[j] for j in nodes),
                         tuple(draft.tokens[j] for j in nodes), tuple(candidates.chain[:chain]),
                         sum(draft.chances[j] for j in nodes), self.probes(seq))

    def _best_plan(self, seqs: list[Sequence], candidates: list[_Candidates], skills: list[float],
                   forced: list[tuple[int | None, int | None]], other_tokens: int, token_limit: int,
                   other_keys: int) -> tuple[list[int], list[int], float, float]:
        """Per sequence the heads' nodes (root included) and lookup tokens, as if every
        sequence had a draft, with the most tokens per second (and that rate, in tokens per
        second without the margin for trees, and plain decoding's); skills: the calibration of each
        sequence's heads' chances; forced: (heads, chain) counts that are not the policy's to
        choose (None: they are)."""
        context = other_keys + sum(seq.num_cached_tokens for seq in seqs)

        def rate(heads: list[int], chains: list[int]) -> float:
            tokens = sum(1.0 + c.gain(h - 1, skill) + c.chain_value(h - 1, m, skill)
                         for c, skill, h, m in zip(candidates, skills, heads, chains))
            num_tokens = sum(heads) + sum(chains) + other_tokens
            trees = sum(h + m > 1 for h, m in zip(heads, chains))
            drafts = sum(h > 1 for h in heads)
            return tokens / self.cost_model(num_tokens, context + num_tokens, trees, drafts)

        def plan_at(price: float | None) -> tuple[list[int], list[int]] | None:
            """The nodes worth `price` (None: none), or None if they do not fit the step."""
            heads, chains = [], []
            for c, skill, (h, m) in zip(candidates, skills, forced):
                heads.append(h if h is not None else 1 if price is None else 1 + c.heads_above(price, skill))
                chains.append(m if m is not None else 0 if price is None else c.chain_above(price))
                chains[-1] = min(chains[-1], self.max_nodes - heads[-1]) if heads[-1] > 1 or not c.extends_only else 0
            if sum(heads) + sum(chains) > token_limit:
                if price is not None and self.fixed_size is None:
                    return None   # a higher price fits: there are enough of them
                # chains give way first, then the biggest trees
                chains = [m if f[1] is not None else 0 for m, f in zip(chains, forced)]
                heads = self._fit(heads, token_limit - sum(chains), seqs)
            return heads, chains

        best = plan_at(None)
        best_rate = plain_rate = rate(*best)
        # a node must keep more than the time one more token costs at that rate, at least:
        # in a compute-bound batch only the surest nodes can pay, and the lower prices need
        # no search (the first one below this floor is still tried: the prices are coarse)
        floor = best_rate * self.cost_model.least_slope(sum(best[0]) + sum(best[1]) + other_tokens, token_limit)
        best_rate *= 1.0 + MARGIN  # trees must win clearly: the models are estimates
        seen = {(tuple(best[0]), tuple(best[1]))}
        for price in reversed(PRICES):   # fewer nodes first: a lower price never takes fewer
            candidate = plan_at(price)
            if candidate is None:
                break
            key = (tuple(candidate[0]), tuple(candidate[1]))
            if key not in seen:   # neighbouring prices often agree
                seen.add(key)
                candidate_rate = rate(*candidate)
                if candidate_rate > best_rate * 1.001:  # prefer the cheaper batch when rates tie
                    best, best_rate = candidate, candidate_rate
            if price < floor:
                break
        return best[0], best[1], rate(*best), plain_rate

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

