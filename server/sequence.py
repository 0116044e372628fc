"""A request inside the engine: the one source of truth for its tokens, cache and state."""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.logits_processor import TokenCounts
from server.lookup import ContextIndex
from server.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.drafter import Draft
    from server.structured import Grammar


SKILL_FLOOR = 0.02
SKILL_WEIGHT = 0.2    # of each scored step in the skill's moving averages
SKILL_PRIOR_TOKENS = 1.0  # the starting skill counts as a step expected to keep this many tokens


# How likely a context-lookup chain's i-th token is kept, until a sequence has shown its own:
# LOOKUP_FIRST for the first token, each further one LOOKUP_DECAY times the one before (about
# 1.7 tokens kept per full chain). On the base model's greedy answers to the evaluation prompts,
# chains of up to 8 after a >= 2-token match kept 2.5 (chat) and 3.9 (code) tokens on average
# (docs/benchmarks.md); the prior stays below.
LOOKUP_FIRST = 0.5
LOOKUP_DECAY = 0.7
LOOKUP_WEIGHT = 0.2  # of each scored chain in the moving averages
# A datastore chain's tokens carry their own confidence (server/datastore.py); a sequence
# scales them by what its datastore chains kept against what their confidences expected,
# starting here (on the evaluation prompts' answers, chains kept 0.6-0.8 of their expectation).
DATASTORE_PRIOR = 0.7


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpeculationStats:
    steps: int = 0               # decoding steps (each verifies one tree)
    drafted: int = 0             # tree tokens verified, root excluded
    accepted: int = 0            # drafted tokens accepted
    accepted_per_depth: list[int] = field(default_factory=list)
    # Accepted over expected drafted tokens (exponential moving averages of each, so that a
    # step the heads expected little of moves it little), the expectation being the heads'
    # own (the chances of the tree's nodes, server/drafter.py): how much better or worse than
    # they think this sequence's heads guess, a calibration. Plain steps keep it
    # current too: the trees their drafts would have made wait in `plain_drafts` until the
    # text after them is known, then are scored (SpeculationPolicy.score_plain_steps), so a
    # sequence the policy stopped speculating for starts again when its text turns predictable.
    skill: float = 1.0
    _kept: float | None = None      # the moving averages behind skill (None: skill is a prior so far)
    _expected: float = SKILL_PRIOR_TOKENS
    plain_drafts: deque = field(default_factory=deque)
    # Per position i of a context-lookup chain, a moving average of whether its first i + 1
    # tokens came true: what the i-th chain token is worth in a tree. Every chain the policy
    # proposed, verified or left out, waits in `pending_lookups` (with the index of its root
    # token) until the text after it is known, then is scored (SpeculationPolicy.score_lookups).
    lookup_survival: list[float] = field(default_factory=list)
    pending_lookups: deque = field(default_factory=deque)
    # Sampled text (typical acceptance) is no yardstick for a shadow tree or a chain: a tree
    # would keep any acceptable token, not only the one drawn. So each step tests the tokens
    # its pending shadow trees and chains expect next by typical acceptance at the step's
    # root: (token index, token) -> acceptable, read when they are scored.
    probe_verdicts: dict = field(default_factory=dict)
    # Datastore chains (proposed when the sequence's own text offers none; they wait in
    # `pending_lookups` with their tokens' confidences): kept over expected tokens, as moving
    # averages, the factor on their confidences.
    datastore_calibration: float = DATASTORE_PRIOR
    hoping: bool = False   # drafted though planned plain (the policy's hope_yield counts what came of it)
    _datastore_kept: float = DATASTORE_PRIOR
    _datastore_expected: float = 1.0

    def record(self, accepted: int, drafted: int, expected_gain: float, head_accepted: int | None = None,
               head_drafted: int | None = None) -> None:
        """One verified tree; the skill counts the heads' own branch (head_*, when the tree
        also held a context-lookup chain) against what the heads expected of it."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.accepted_per_depth) < accepted:
            self.accepted_per_depth.append(0)
        for d in range(accepted):
            self.accepted_per_depth[d] += 1
        head_accepted = accepted if head_accepted is None else head_accepted
        if (drafted if head_drafted is None else head_drafted):
            self._update_skill(head_accepted, expected_gain)

    def lookup_value(self, position: int) -> float:
        """How likely a chain's tokens 0..position all come true (the position-th token's worth)."""
        if position < len(self.lookup_survival):
            return self.lookup_survival[position]
        return LOOKUP_FIRST * LOOKUP_DECAY ** position

    def record_lookup(self, proposed: int, kept: int) -> None:
        """A chain of `proposed` tokens (as far as the text is known) of which the first `kept` came true."""
        for i in range(proposed):
            value = self.lookup_value(i)
            value += LOOKUP_WEIGHT * (float(kept > i) - value)
            if i < len(self.lookup_survival):
                self.lookup_survival[i] = value
            else:
                self.lookup_survival.append(value)

    def record_datastore(self, kept: int, expected: float) -> None:
        """A datastore chain of which the first `kept` tokens came true, against `expected`
        (the sum of its known tokens' confidences)."""
        self._datastore_kept += LOOKUP_WEIGHT * (kept - self._datastore_kept)
        self._datastore_expected += LOOKUP_WEIGHT * (expected - self._datastore_expected)
        self.datastore_calibration = min(2.0, max(SKILL_FLOOR, self._datastore_kept / max(self._datastore_expected, 1e-3)))

    def record_shadow(self, kept: int, expected_gain: float) -> None:
        """A plain step scored after the fact: a tree would have kept `kept` of its draft."""
        self._update_skill(kept, expected_gain)

    def _update_skill(self, kept: int, expected: float) -> None:
        if self._kept is None:   # whatever skill was set to so far is the prior
            self._kept = self.skill * self._expected
        self._kept += SKILL_WEIGHT * (kept - self._kept)
        self._expected += SKILL_WEIGHT * (expected - self._expected)
        self.skill = min(3.0, max(SKILL_FLOOR, self._kept / max(self._expected, 1e-3)))


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)   # prompt + generated
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0       # tokens whose keys and values are in the cache
    prefix_hashes: list[bytes] = field(default_factory=list)  # of its first full blocks of tokens (chain_hashes)
    registered_blocks: int = 0       # of block_table's first blocks, those in the prefix cache (or offered to it)
    num_prompt_cache_hits: int = 0   # prompt tokens found in the prefix cache at its first admission
    # params.prompt_logprobs: the prompt's tokens' (None for the first), filled chunk by chunk,
    # handed out with the first output (then None: a recomputed prompt is not scored again)
    prompt_logprobs: list | None = None
    draft: Draft | None = None       # the heads' guesses for the next tree (server/drafter.py)
    context_index: ContextIndex = field(default_factory=ContextIndex)  # for context lookup drafts
    spec: SpeculationStats = field(default_factory=SpeculationStats)
    token_counts: TokenCounts = field(default_factory=TokenCounts)   # the penalties' context
    grammar: Grammar | None = None   # structured outputs: where its output is in its grammar
    finish_reason: str | None = None
    error: str | None = None         # why it finished with "error"
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    generator: object = None         # torch.Generator for seeded sampling, set by the runner
    output_state: object = None      # detokenizer and stop-string state, owned by the output processor

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def scores_prompt(self) -> bool:
        """Its prompt's log-probabilities are still to be computed (all its prompt rows get logits)."""
        return self.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still needs its keys computed."""
        return self.num_uncached_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - self.num_output_tokens

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, every token gets recomputed."""
        self.num_cached_tokens = 0
        self.registered_blocks = 0
        if self.prompt_logprobs is not None:   # not handed out yet: scored again from the start
            self.prompt_logprobs = [None]
        self.draft = None
        self.status = SequenceStatus.WAITING
