"""Which sequences run this step, with how many tokens each. Plain Python, no torch.

First come, first served. Running sequences that decode go first, each with a tree whose
size the speculation policy picks; then prompt chunks (chunked prefill) of running
sequences, then newly admitted ones, within a per-step token budget and the free KV-cache
blocks. When blocks run out, the latest arrival is preempted: its blocks are freed and it
is recomputed later, never lost.

With the prefix cache (server/block_manager.py), a sequence being admitted starts from the
cached blocks of its longest cached prefix of full blocks, short of its last token (whose
logits the step needs), so its prefill starts after them; and after every step each
sequence offers its newly completed blocks to the cache (`cache_blocks`). Every write of a
step lands at or after a sequence's num_cached_tokens, past its shared blocks. A sequence
whose next block a running prompt is still computing (the other choices of an n > 1
request, a burst of requests with one system prompt) waits for it, and admission with it:
it then shares that block instead of computing it again.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from server.block_manager import BlockManager, chain_hashes
from server.sequence import Sequence, SequenceStatus
from server.tree import StepTree

if TYPE_CHECKING:
    from server.speculation_policy import SpeculationPolicy


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int    # prompt chunk length, or the tree's node count for decodes
    is_prefill: bool
    draft: int = 0         # tree nodes the heads draft after this step, for the next one (0: none)
    tree: StepTree | None = None  # decodes: what the sequence verifies (server/tree.py)


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledSequence] = field(default_factory=list)
    decodes: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_queries: int = 0   # prompt tokens of the admitted sequences looked up in the prefix cache
    prefix_hits: int = 0      # of them, those found there (not computed again)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.prefills + self.decodes)

    @property
    def keys_read(self) -> int:
        """Keys the attention reads: each sequence's context and new tokens, once."""
        return sum(s.seq.num_cached_tokens + s.num_new_tokens for s in self.prefills + self.decodes)

    @property
    def num_trees(self) -> int:
        return sum(s.num_new_tokens > 1 for s in self.decodes)

    @property
    def num_drafts(self) -> int:
        """Sequences whose heads draft after this step (a prompt only once it is complete)."""
        return sum(s.draft > 0 for s in self.decodes) + sum(
            s.draft > 0 and s.seq.num_cached_tokens + s.num_new_tokens == s.seq.num_tokens for s in self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: SpeculationPolicy | None):
        """policy: tree sizes and drafting per step (server/speculation_policy.py)."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if not s.is_prefilling]
        pending_prefill = sum(s.num_uncached_tokens for s in self.running if s.is_prefilling)
        for seq in self.waiting:   # as far as it matters: past the budget, trees get one node each
            if pending_prefill >= budget:
                break
            pending_prefill += seq.num_uncached_tokens - self._cached_tokens(seq)
        # trees get only the budget that waiting prompt tokens leave over: admitting work raises
        # the batch's throughput more than a tree does, and a tree must never delay a prompt
        tree_budget = max(len(decoding), budget - pending_prefill)
        prefill_tokens = min(pending_prefill, budget)
        plan = self.policy.choose(decoding, prefill_tokens, tree_budget, prefill_tokens)
        for seq, tree, draft in zip(decoding, plan.trees, plan.drafts):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted to make room for an earlier arrival
            if not self._reserve(seq, seq.num_cached_tokens + tree.num_nodes, out):
                continue  # seq itself was preempted
            out.decodes.append(ScheduledSequence(seq, tree.num_nodes, is_prefill=False, draft=draft, tree=tree))
            budget -= tree.num_nodes
        for seq in [s for s in self.running if s.is_prefilling]:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            chunk = min(seq.num_uncached_tokens, budget)
            if not self._reserve(seq, seq.num_cached_tokens + chunk, out):
                continue
            out.prefills.append(ScheduledSequence(seq, chunk, is_prefill=True,
                                                  draft=self.policy.draft_after_prefill(seq)))
            budget -= chunk
        computing = None   # the prefix hashes of full blocks that running prompts have yet to compute
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._share_cached(seq)
            if self.block_manager.caching:
                computing = computing if computing is not None else self._blocks_being_computed()
                if self._next_block_hash(seq) in computing:
                    self._unshare(seq)   # it shares the next block once that is computed
                    break
            chunk = min(seq.num_uncached_tokens, budget)
            # admit only with room for the chunk plus one block of headroom, so admissions
            # do not immediately force preemptions
            if not self.block_manager.can_grow(seq.block_table, seq.num_cached_tokens + chunk
                                               + self.block_manager.block_size):
                self._unshare(seq)
                break
            self.waiting.popleft()
            self.block_manager.grow(seq.block_table, seq.num_cached_tokens + chunk)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:   # (a preempted sequence's return finds its own blocks)
                seq.first_scheduled_time = time.monotonic()
                seq.num_prompt_cache_hits = hits
                out.prefix_queries += seq.num_tokens if self.block_manager.caching else 0
                out.prefix_hits += hits
            self.running.append(seq)
            out.prefills.append(ScheduledSequence(seq, chunk, is_prefill=True,
                                                  draft=self.policy.draft_after_prefill(seq)))
            budget -= chunk
            if computing is not None:
                computing.update(self._uncomputed_hashes(seq))
        return out

    def cache_blocks(self, seq: Sequence) -> None:
        """Offer seq's blocks that became full of final keys and values (its tokens' and
        their cache's common part) to the prefix cache."""
        manager = self.block_manager
        full = min(seq.num_cached_tokens, seq.num_tokens, len(seq.block_table) * manager.block_size) // manager.block_size
        if not manager.caching or full <= seq.registered_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.registered_blocks, full):
            manager.register(seq.block_table[i], hashes[i])
        seq.registered_blocks = full

    def _shareable_hashes(self, seq: Sequence) -> list[bytes]:
        """The prefix hashes of a waiting sequence's full blocks short of its last token."""
        usable = (seq.num_tokens - 1) // self.block_manager.block_size
        return self._hashes(seq, usable)[:usable]

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        return chain_hashes(seq.token_ids, self.block_manager.block_size, seq.prefix_hashes, count,
                            seq.params.cache_salt)

    def _may_share(self, seq: Sequence) -> bool:
        """A waiting sequence can start from cached blocks: it holds none, and it does not
        need its prompt's logits (prompt logprobs)."""
        return self.block_manager.caching and not seq.block_table and not seq.scores_prompt

    def _cached_tokens(self, seq: Sequence) -> int:
        """What a waiting sequence would find in the prefix cache now (no block taken)."""
        manager = self.block_manager
        if not self._may_share(seq):
            return 0
        return manager.count_cached(self._shareable_hashes(seq)) * manager.block_size

    def _share_cached(self, seq: Sequence) -> int:
        """Start a sequence that holds no blocks (new or preempted) from the cached blocks of
        its longest cached prefix, short of its last token; returns the tokens found."""
        manager = self.block_manager
        if not self._may_share(seq):
            return 0
        seq.registered_blocks = manager.share_cached(seq.block_table, self._shareable_hashes(seq))
        seq.num_cached_tokens = seq.registered_blocks * manager.block_size
        return seq.num_cached_tokens

    def _blocks_being_computed(self) -> set[bytes]:
        return {h for s in self.running if s.is_prefilling for h in self._uncomputed_hashes(s)}

    def _uncomputed_hashes(self, seq: Sequence) -> list[bytes]:
        """The prefix hashes of seq's full blocks of prompt whose keys and values are still to come."""
        full = seq.num_tokens // self.block_manager.block_size
        return self._hashes(seq, full)[seq.num_cached_tokens // self.block_manager.block_size:full]

    def _next_block_hash(self, seq: Sequence) -> bytes | None:
        """The prefix hash of the block a sequence admitted now would compute first, if it
        could share it (a full block short of its last token); else None."""
        usable = (seq.num_tokens - 1) // self.block_manager.block_size
        if seq.scores_prompt or seq.registered_blocks >= usable:
            return None
        return self._hashes(seq, usable)[seq.registered_blocks]

    def _unshare(self, seq: Sequence) -> None:
        """Undo _share_cached for a sequence that stays waiting."""
        if self.block_manager.caching:
            self.block_manager.free(seq.block_table)
            seq.num_cached_tokens = seq.registered_blocks = 0

    def _reserve(self, seq: Sequence, num_slots: int, out: SchedulerOutput) -> bool:
        """Grow seq's blocks to num_slots, preempting the latest arrivals if needed.

        Returns False when seq itself had to be preempted.
        """
        while not self.block_manager.can_grow(seq.block_table, num_slots):
            victim = max(self.running, key=lambda s: s.arrival_time)
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.block_manager.grow(seq.block_table, num_slots)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        # a victim already scheduled this step must not run
        out.decodes = [s for s in out.decodes if s.seq is not seq]
        out.prefills = [s for s in out.prefills if s.seq is not seq]
