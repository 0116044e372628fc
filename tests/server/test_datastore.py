"""Datastore lookup: the vote against a brute-force one, key packing, files, the policy's
use of datastore chains, and exact output from an engine that drafts with them."""
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from engine_helpers import PROMPTS, chat_ids, reference, run_to_completion
from models.distill_data import DATASTORE_EXCLUDED, datastore_answers
from server.config import EngineConfig
from server.cost_model import StepCostModel
from server.drafter import Draft
from server.datastore import MAX_MATCH, MIN_CONFIDENCE, MIN_MATCH, Datastore
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from server.sequence import Sequence
from server.speculation_policy import SpeculationPolicy
from server.tree import expand_tree

ACCURACIES = [[0.7, 0.15, 0.05], [0.5, 0.1, 0.05], [0.4, 0.08], [0.3, 0.05]]
PATHS = tuple(expand_tree(ACCURACIES, 64))
FLAT = {1: 0.05, 16: 0.055, 64: 0.07, 256: 0.2}


def brute_force(answers: list[list[int]], tokens: list[int], max_tokens: int) -> list[int]:
    """Every occurrence of the longest suffix (MAX_MATCH..MIN_MATCH tokens) inside one
    answer; then, position by position, the most common next token among the occurrences
    that agree so far (ties: the smallest id), while the product of vote shares (an answer
    that ends votes against, and one more, unseen occurrence) stays >= MIN_CONFIDENCE."""
    for n in range(min(MAX_MATCH, len(tokens)), MIN_MATCH - 1, -1):
        suffix = tokens[-n:]
        starts = [(a, i) for a, answer in enumerate(answers) for i in range(n, len(answer) + 1)
                  if answer[i - n:i] == suffix]
        if not starts:
            continue
        chain, confidence = [], 1.0
        for depth in range(max_tokens):
            votes = [answers[a][i + depth] if i + depth < len(answers[a]) else None for a, i in starts]
            counts = Counter(v for v in votes if v is not None)
            if not counts:
                break
            best = min(counts, key=lambda v: (-counts[v], v))
            confidence *= counts[best] / (len(votes) + 1)
            if confidence < MIN_CONFIDENCE:
                break
            chain.append(best)
            starts = [s for s, v in zip(starts, votes) if v == best]
        return chain
    return []


@pytest.mark.parametrize("seed", range(25))
def test_vote_matches_a_brute_force_search(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 9])
    answers = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 8))]
    store = Datastore.from_answers(answers)
    for _ in range(30):
        query = [rng.randrange(vocab + 1) for _ in range(rng.randint(1, 6))]
        assert store.continuation(query, 6) == brute_force(answers, query, 6), (answers, query)


def test_large_token_ids_pack_exactly():
    """Ids of 16 bits fill a 64-bit key with 4 tokens; grams that differ only in high bits
    or only in the first token stay apart."""
    store = Datastore.from_answers([[49151, 32768, 1, 2, 7, 7], [16383, 32768, 1, 2, 8, 8]])
    assert store.max_match == 4
    assert store.continuation([49151, 32768, 1, 2], 4) == [7, 7]
    assert store.continuation([16383, 32768, 1, 2], 4) == [8, 8]
    assert store.continuation([5, 32768, 1, 2], 4) == [7, 7]   # (32768, 1, 2): a tie, the smaller id
    assert store.continuation([1 << 16, 1], 4) == []        # an id past the store's 16 bits


def test_chains_stop_at_the_end_of_an_answer_and_at_max_tokens():
    store = Datastore.from_answers([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert store.continuation([1, 2], 8) == [3, 4]
    assert store.continuation([1, 2], 1) == [3]
    assert store.continuation([1, 2], 0) == []
    assert store.continuation([3, 4], 8) == []       # both answers end there


def test_save_and_load_give_the_same_chains(tmp_path):
    rng = random.Random(0)
    answers = [[rng.randrange(40) for _ in range(50)] for _ in range(20)]
    store = Datastore.from_answers(answers)
    store.save(tmp_path / "store.safetensors")
    loaded = Datastore.load(tmp_path / "store.safetensors")
    assert loaded.num_tokens == store.num_tokens == 1000
    for answer in answers:
        for end in range(2, 50, 7):
            assert loaded.continuation(answer[:end], 8) == store.continuation(answer[:end], 8)


def test_datastore_answers_leave_out_held_out_prompts_and_excluded_sources(tmp_path):
    sources = ["template", sorted(DATASTORE_EXCLUDED)[0], "template", "snippet"]
    held_out = [False, False, True, False]
    (tmp_path / "prompts.json").write_text(json.dumps(
        [{"source": s, "text": f"p{i}", "held_out": h} for i, (s, h) in enumerate(zip(sources, held_out))]))
    (tmp_path / "shards").mkdir()
    answers = [[10, 11], [20, 21, 22], [30], [40, 41]]
    save_file({"tokens": torch.tensor([t for a in answers for t in a], dtype=torch.int32),
               "offsets": torch.tensor([0, 2, 5, 6, 8]), "prompt_index": torch.arange(4),
               "held_out": torch.tensor(held_out, dtype=torch.int8), "hidden": torch.zeros(8, 2)},
              str(tmp_path / "shards" / "shard_00000.safetensors"))
    assert datastore_answers(tmp_path) == [[10, 11], [40, 41]]


def make_seq(tokens, drafted=True):
    seq = Sequence("s", tokens, SamplingParams(max_tokens=100, temperature=0.0))
    seq.status = seq.status.RUNNING
    if drafted:  # a draft of prior chances, as after a step that planned a tree
        policy = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(FLAT), max_nodes=64)
        seq.draft = Draft([0] * len(PATHS), list(policy.prior_chances))
    return seq


def test_policy_prefers_the_sequences_own_text_and_asks_the_datastore_only_for_drafted_ones():
    store = Datastore.from_answers([[3, 4, 20, 21, 22]] * 3)
    policy = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(FLAT), max_nodes=64, lookup_tokens=8,
                               datastore=store)
    fresh = make_seq([9, 9, 3, 4])                       # its own text has no earlier (3, 4)
    assert policy.choose([fresh], 0, 1024).lookups == [[20, 21, 22]]
    chain, root, confidences = fresh.spec.pending_lookups[0]
    assert (chain, root) == ([20, 21, 22], 3)
    assert confidences == pytest.approx([0.75, 0.75 ** 2, 0.75 ** 3])   # 3 of 3 (+ 1 unseen) votes at each depth
    fresh.token_ids += [20, 21, 99]
    policy.score_lookups(fresh)              # 2 kept where the confidences expected their sum
    expected = 0.75 + 0.75 ** 2 + 0.75 ** 3
    assert fresh.spec.datastore_calibration == pytest.approx((0.7 + 0.2 * (2 - 0.7)) / (1.0 + 0.2 * (expected - 1)))
    assert fresh.spec.lookup_survival == []              # the context chains' record is their own
    repeating = make_seq([3, 4, 5, 6, 7, 3, 4])          # its own (3, 4) came before: that chain goes first
    assert policy.choose([repeating], 0, 1024).lookups == [[5, 6, 7, 3, 4]]
    assert repeating.spec.pending_lookups[0][2] is None
    plain = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(FLAT), max_nodes=64, lookup_tokens=8)
    assert plain.choose([make_seq([9, 9, 3, 4])], 0, 1024).lookups == [[]]
    undrafted = make_seq([9, 9, 3, 4], drafted=False)   # decoding plainly: the datastore starts no tree
    assert policy.choose([undrafted], 0, 1024).lookups == [[]] and not undrafted.spec.pending_lookups


@pytest.fixture(scope="module")
def datastore_engine(random_heads):
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.25), random_heads)


def test_engine_drafting_from_a_datastore_is_exact(datastore_engine):
    """Random heads keep almost nothing; a datastore of the model's own answers to some
    prompts makes most of their tokens come from its chains, and answers to other prompts
    (chains that rarely hold) change nothing either: the output is plain greedy decoding."""
    engine = datastore_engine
    params = SamplingParams(max_tokens=40, temperature=0.0)
    ids = {p: chat_ids(engine.tokenizer, p) for p in PROMPTS[:6]}
    expected = {p: reference(engine, ids[p], params) for p in PROMPTS[:6]}
    engine.datastore = Datastore.from_answers([expected[p] for p in PROMPTS[:3]])
    engine.set_tree_budget(8)  # fixed trees: every step drafts, so every step asks the datastore
    requests = {p: (ids[p], params) for p in PROMPTS[:6]}
    kept = 0
    for p in PROMPTS[:6]:  # one at a time: each request's own counters
        engine.add_request(p, ids[p], params)
        seq = engine.sequences[p]
        while engine.has_unfinished_requests():
            engine.step()
        assert seq.output_ids == expected[p], p
        kept += seq.spec.accepted if p in PROMPTS[:3] else 0
    assert kept >= sum(len(expected[p]) for p in PROMPTS[:3]) // 2
    engine.set_tree_budget(None)
    outputs = run_to_completion(engine, {f"batch {p}": v for p, v in requests.items()})
    assert outputs == {f"batch {p}": expected[p] for p in PROMPTS[:6]}
    assert not engine.scheduler.running and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_engine_takes_the_heads_datastore_unless_told_otherwise(tmp_path):
    from types import SimpleNamespace

    from server.loading import load_datastore
    path = tmp_path / "store.safetensors"
    Datastore.from_answers([[1, 2, 3]]).save(path)
    heads = SimpleNamespace(datastore_path=path)
    assert load_datastore(EngineConfig(), heads).num_tokens == 3
    assert load_datastore(EngineConfig(), SimpleNamespace()) is None           # heads without one
    assert load_datastore(EngineConfig(datastore="none"), heads) is None
    assert load_datastore(EngineConfig(lookup_tokens=0), heads) is None         # no chains at all
    assert load_datastore(EngineConfig(speculation=False), heads) is None
    assert load_datastore(EngineConfig(datastore=str(path)), heads).num_tokens == 3
    assert load_datastore(EngineConfig(datastore=str(path)), None) is None    # no heads to extend
    with pytest.raises(FileNotFoundError, match="no datastore file"):
        load_datastore(EngineConfig(datastore=str(tmp_path / "missing")), heads)


def test_a_common_gram_votes_with_a_sample_from_across_the_store():
    """More occurrences than MAX_OCCURRENCES: an even sample votes, not the first ones (here
    the first 300 answers say 5, the last 600 say 6)."""
    from server.datastore import MAX_OCCURRENCES
    store = Datastore.from_answers([[1, 2, 5]] * 300 + [[1, 2, 6]] * 600)
    assert 300 > MAX_OCCURRENCES and store.continuation([1, 2], 1) == [6]


def test_bad_token_ids_are_refused():
    import numpy as np
    with pytest.raises(ValueError, match="token ids"):
        Datastore(np.array([5, 6, -5, -1]))


def test_datastore_chains_never_make_a_tree_of_their_own():
    """A drafted sequence whose heads' nodes have no chance at all decodes plainly: its
    datastore chain (whose tokens alone would pay) may not be a tree of its own. With heads'
    nodes in the tree, the chain goes along; a chain from the sequence's own text may go alone."""
    store = Datastore.from_answers([[3, 4, 20, 21, 22]] * 3)
    policy = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(FLAT), max_nodes=64, lookup_tokens=8,
                               datastore=store)
    hopeless = Draft([0] * len(PATHS), [0.0] * len(PATHS))
    seq = make_seq([9, 9, 3, 4])
    seq.draft = hopeless
    plan = policy.choose([seq], 0, 1024)
    assert plan.sizes == [1] and plan.lookups == [[]]
    plan = policy.choose([make_seq([9, 9, 3, 4])], 0, 1024)   # a draft with chances
    assert plan.sizes[0] > 1 and plan.lookups == [[20, 21, 22]]
    own = make_seq([3, 4, 20, 21, 22, 9, 3, 4])
    own.draft = hopeless
    plan = policy.choose([own], 0, 1024)
    assert plan.sizes == [1] and plan.lookups == [[20, 21, 22, 9, 3, 4]]
