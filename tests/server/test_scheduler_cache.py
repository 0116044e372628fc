"""The scheduler over the prefix cache, driven without a model.

Steps are simulated as the engine runs them: prompt chunks computed, tree rows written (the
rejected ones leave garbage) and accepted rows moved into place, the bonus token left for
the next step, tokens cut at a stop or max_tokens, requests aborted, steps failed. Every
cache slot is tracked as the token prefix whose keys and values it holds, so a step that
reads a wrong context, writes into a block another sequence or the cache holds, or a block
registered under a prefix it does not hold, fails the test.
"""
import random
from types import SimpleNamespace

import pytest

from server.block_manager import BlockManager, chain_hashes
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler
from server.sequence import Sequence, SequenceStatus

BLOCK = 4
VOCAB = 6       # few token values: prompts and answers share beginnings often


class RandomTrees:
    """The speculation policy's part: a random tree size for each decoding sequence."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.tree_budgets: list[int] = []

    def choose(self, decoding, prefill_tokens, tree_budget, *_):
        self.tree_budgets.append(tree_budget)
        return SimpleNamespace(trees=[SimpleNamespace(num_nodes=self.rng.randint(1, 6)) for _ in decoding],
                               drafts=[0] * len(decoding))

    def draft_after_prefill(self, seq):
        return 0


class Simulation:
    def __init__(self, seed: int):
        self.rng = rng = random.Random(seed)
        self.manager = BlockManager(rng.randint(6, 40), BLOCK, caching=True)
        self.scheduler = Scheduler(self.manager, rng.randint(1, 6), rng.randint(6, 40), RandomTrees(rng))
        self.slots: dict[int, tuple] = {}        # slot -> the tokens whose last one's keys it holds
        self.prefixes: dict[bytes, tuple] = {}   # prefix hash -> its tokens
        self.live: dict[str, Sequence] = {}
        self.beginnings = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 20))] for _ in range(3)]
        self.count = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // BLOCK] * BLOCK + position % BLOCK

    def arrive(self) -> None:
        rng = self.rng
        prompt = rng.choice(self.beginnings) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]
        max_tokens = rng.randint(1, 12)
        if (len(prompt) + max_tokens + 6 + BLOCK - 1) // BLOCK > self.manager.num_blocks:
            return   # the engine refuses a request that could never fit
        for _ in range(rng.choice([1, 1, 3])):   # sometimes the n choices of one request
            seq = Sequence(f"r{self.count}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))
            self.count += 1
            self.live[seq.request_id] = seq
            self.scheduler.add(seq)

    def finish(self, seq: Sequence) -> None:
        self.live.pop(seq.request_id, None)
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def check_step(self, items) -> None:
        for item in items:
            seq = item.seq
            # a step computes at least a sequence's last token: its logits give the next one
            assert item.num_new_tokens >= 1 and seq.num_cached_tokens + item.num_new_tokens <= seq.num_tokens + (
                0 if item.is_prefill else item.num_new_tokens - 1)
            assert item.is_prefill or seq.num_cached_tokens == seq.num_tokens - 1
            for p in range(seq.num_cached_tokens, seq.num_cached_tokens + item.num_new_tokens):
                block = seq.block_table[p // BLOCK]
                assert self.manager.ref_counts[block] == 1, "a step writes into a shared block"
                assert block not in self.manager.block_hashes, "a step writes into a cached block"
            for p in range(seq.num_cached_tokens):
                assert self.slots.get(self.slot(seq, p)) == tuple(seq.token_ids[:p + 1]), "a step reads a wrong context"

    def learn_prefixes(self, seq: Sequence) -> None:
        for i, h in enumerate(seq.prefix_hashes):
            self.prefixes[h] = tuple(seq.token_ids[:(i + 1) * BLOCK])

    def check_cache(self) -> None:
        for seq in self.live.values():
            self.learn_prefixes(seq)
        for h, block in self.manager.cached.items():
            tokens = self.prefixes[h]
            for j in range(BLOCK):
                assert self.slots.get(block * BLOCK + j) == tokens[:len(tokens) - BLOCK + j + 1], \
                    "a cached block does not hold its prefix"
        held = [b for s in self.scheduler.running for b in s.block_table]
        assert all(not s.block_table for s in self.scheduler.waiting)
        for block in range(self.manager.num_blocks):
            assert self.manager.ref_counts[block] == held.count(block)
        assert len(self.manager.free_blocks) + len(self.manager.evictable) + len(set(held)) == self.manager.num_blocks

    def run_item(self, item) -> None:
        seq, n, start, rng = item.seq, item.num_new_tokens, item.seq.num_cached_tokens, self.rng
        if item.is_prefill:
            for p in range(start, start + n):
                self.slots[self.slot(seq, p)] = tuple(seq.token_ids[:p + 1])
            seq.num_cached_tokens = start + n
            new = [rng.randrange(VOCAB)] if start + n == seq.num_tokens else []
        else:
            for p in range(start + 1, start + n):   # rows of the tree: what is rejected stays garbage
                self.slots[self.slot(seq, p)] = ("rejected", rng.random())
            self.slots[self.slot(seq, start)] = tuple(seq.token_ids[:start + 1])
            kept = rng.randint(0, n - 1)
            new = [rng.randrange(VOCAB) for _ in range(kept + 1)]   # the kept rows, then the bonus token
            text = seq.token_ids + new
            for depth in range(1, kept + 1):   # moved into place
                self.slots[self.slot(seq, start + depth)] = tuple(text[:start + depth + 1])
            seq.num_cached_tokens = start + 1 + kept
        for token in new:
            seq.token_ids.append(token)
            if seq.num_output_tokens >= seq.params.max_tokens or (token == 0 and rng.random() < 0.3):
                seq.finish_reason = "stop"   # the rest of the step's tokens are cut
                break
        self.scheduler.cache_blocks(seq)
        self.learn_prefixes(seq)
        if seq.finish_reason is not None:
            self.finish(seq)
        elif new:
            self.manager.shrink(seq.block_table, seq.num_cached_tokens)

    def step(self, arrivals: bool) -> None:
        rng = self.rng
        if arrivals and rng.random() < 0.3 and len(self.live) < 12:
            self.arrive()
        if arrivals and self.live and rng.random() < 0.05:
            self.finish(self.live[rng.choice(list(self.live))])   # an abort
        out = self.scheduler.schedule()
        items = out.prefills + out.decodes
        self.check_step(items)
        if arrivals and items and rng.random() < 0.03:   # a failed step fails its requests
            for item in items:
                self.finish(item.seq)
        else:
            for item in items:
                self.run_item(item)
        self.check_cache()


@pytest.mark.parametrize("seed", range(40))
def test_no_step_reads_or_writes_a_wrong_block_and_every_request_finishes(seed):
    sim = Simulation(seed)
    for _ in range(300):
        sim.step(arrivals=True)
    for _ in range(400):   # then drain: nothing may wait forever
        if not sim.live:
            break
        sim.step(arrivals=False)
    assert not sim.live, "requests were left waiting"
    assert sim.manager.num_free_blocks == sim.manager.num_blocks


def test_a_cached_waiting_prompt_leaves_the_step_budget_to_trees():
    """A waiting request whose prompt is cached does not count as pending prompt work: the
    decoding sequences' trees keep the step's budget."""
    policy = RandomTrees(random.Random(0))
    manager = BlockManager(64, BLOCK, caching=True)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=32, policy=policy)
    prompt = list(range(40))
    first = Sequence("first", prompt, SamplingParams(max_tokens=4, temperature=0.0))
    scheduler.add(first)
    scheduler.schedule()                       # its whole prompt in one chunk of 32, then 8
    first.num_cached_tokens = 32
    scheduler.schedule()
    first.num_cached_tokens = 40
    first.token_ids.append(5)
    scheduler.cache_blocks(first)
    assert len(manager.cached) == 10
    second = Sequence("second", prompt + [7], SamplingParams(max_tokens=4, temperature=0.0))
    scheduler.add(second)
    policy.tree_budgets.clear()
    out = scheduler.schedule()
    assert policy.tree_budgets == [32 - 1]     # only its last token is left to compute
    assert out.prefills[0].seq is second and out.prefills[0].num_new_tokens == 1 and out.prefix_hits == 40


def test_a_salt_keeps_requests_from_sharing_blocks():
    tokens = list(range(16))
    plain, salted, other = (chain_hashes(tokens, BLOCK, [], 4, salt) for salt in (None, "tenant-a", "tenant-b"))
    assert len({plain[0], salted[0], other[0]}) == 3 and not set(plain) & set(salted)
    assert chain_hashes(tokens, BLOCK, [], 4, "tenant-a") == salted
