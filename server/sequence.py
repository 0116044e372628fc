"""A request inside the engine: the one source of truth for its tokens, cache and state."""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from server.lookup import ContextIndex
from server.sampling_params import SamplingParams


SKILL_FLOOR = 0.02


# Tokens a lookup chain keeps, until a sequence has shown its own: on the base model's greedy
# answers to the evaluation prompts, chains of up to 8 after a >= 2-token match kept 2.5
# (chat) and 3.9 (code) tokens on average (docs/benchmarks.md); the prior stays well below.
LOOKUP_GAIN_PRIOR = 1.0

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
    # Exponential moving average of accepted / expected drafted tokens under the prior
    # accuracies: how much better or worse than the tree's estimate this sequence's heads
    # guess. Plain steps keep it current too: their drafts wait in `plain_drafts` (with the
    # index of their root token) until the text after them is known, then are scored exactly
    # (SpeculationPolicy.score_plain_steps), so a sequence the policy stopped speculating for
    # starts again when its text turns predictable.
    skill: float = 1.0
    plain_drafts: deque = field(default_factory=deque)
    # Moving average of the tokens a context-lookup chain kept when verified (whichever
    # branch the step accepted); the policy weighs it against a chain's cost on plain steps.
    lookup_gain: float = LOOKUP_GAIN_PRIOR
    dropped_lookups: deque = field(default_factory=deque)  # (chain, root index) left out of a step

    def record(self, accepted: int, drafted: int, expected_gain: float, head_accepted: int | None = None,
               head_drafted: int | None = None) -> None:
        """One verified tree; the skill counts the heads' own branch (head_*, when the tree
        also held a context-lookup chain) against what the prior expected of it."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.accepted_per_depth) < accepted:
            self.accepted_per_depth.append(0)
        for d in range(accepted):
            self.accepted_per_depth[d] += 1
        head_accepted = accepted if head_accepted is None else head_accepted
        if (drafted if head_drafted is None else head_drafted):
            self._update_skill(head_accepted / max(expected_gain, 0.05))

    def record_lookup(self, kept: int) -> None:
        self.lookup_gain = 0.8 * self.lookup_gain + 0.2 * kept

    def record_shadow(self, kept: int, expected_gain: float) -> None:
        """A plain step scored after the fact: a tree would have kept `kept` of its draft."""
        self._update_skill(kept / max(expected_gain, 0.05))

    def _update_skill(self, ratio: float) -> None:
        self.skill = max(SKILL_FLOOR, 0.8 * self.skill + 0.2 * min(3.0, ratio))


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
    draft: list[int] | None = None   # the heads' next tree, one token per path (server/drafter.py)
    context_index: ContextIndex = field(default_factory=ContextIndex)  # for context lookup drafts
    spec: SpeculationStats = field(default_factory=SpeculationStats)
    finish_reason: str | None = None
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
        self.draft = None
        self.status = SequenceStatus.WAITING
