"""Context lookup drafts: the index against a brute-force search, and the lookup chain in
trees, acceptance and the policy."""
import random

import pytest

from server.acceptance import accept_greedy
from server.cost_model import StepCostModel
from server.lookup import MAX_MATCH, MIN_MATCH, ContextIndex
from server.sampling_params import SamplingParams
from server.sequence import Sequence
from server.speculation_policy import SpeculationPolicy, chain_kept
from server.drafter import Draft
from server.tree import LOOKUP_RANK, Tree, expand_tree

ACCURACIES = [[0.7, 0.15, 0.05], [0.5, 0.1, 0.05], [0.4, 0.08], [0.3, 0.05]]
PATHS = tuple(expand_tree(ACCURACIES, 64))


def brute_force(tokens: list[int], max_tokens: int) -> list[int]:
    """The latest earlier occurrence of the longest suffix of MAX_MATCH..MIN_MATCH tokens."""
    end = len(tokens)
    for n in range(MAX_MATCH, MIN_MATCH - 1, -1):
        if end <= n:
            continue
        for start in range(end - 1, n - 1, -1):   # start: the index after the occurrence
            if tokens[start - n:start] == tokens[end - n:]:
                return tokens[start:start + max_tokens]
    return []


@pytest.mark.parametrize("seed", range(20))
def test_index_finds_what_a_full_search_finds(seed):
    """(Fewer than MAX_CANDIDATES occurrences of any gram here, so the index sees them all.)"""
    rng = random.Random(seed)
    tokens = [rng.randrange(4) for _ in range(6)]
    index = ContextIndex()
    for _ in range(100):   # grown a few tokens at a time, as a sequence is
        tokens += [rng.randrange(4 if rng.random() < 0.7 else 9) for _ in range(rng.randint(1, 3))]
        assert index.continuation(tokens, 5) == brute_force(tokens, 5)


def test_a_repeated_phrase_is_proposed_and_an_unseen_one_is_not():
    index = ContextIndex()
    text = [5, 6, 7, 8, 9, 10, 11, 1, 2, 6, 7]
    assert index.continuation(text, 4) == [8, 9, 10, 11]
    assert index.continuation(text + [42], 4) == []          # (7, 42) never occurred
    assert ContextIndex().continuation([1, 2], 4) == []


def test_the_longer_match_wins_over_the_later_one():
    tokens = [1, 2, 3, 50, 9, 2, 3, 60, 1, 2, 3]
    assert ContextIndex().continuation(tokens, 1) == [50]     # (1, 2, 3) beats the later (2, 3)


def test_greedy_acceptance_follows_the_longer_of_two_equal_siblings():
    """The heads' rank-0 guess and the lookup chain both start with token 7; only the lookup
    chain goes on matching, and its path must win whichever sibling comes first."""
    tree = Tree.from_paths(((0,),) + tuple((LOOKUP_RANK,) * d for d in (1, 2, 3)))   # heads (0,), a chain of 3
    tokens = [0] * tree.num_nodes
    heads_node = tree.paths.index((0,))
    chain = [tree.paths.index((LOOKUP_RANK,) * d) for d in (1, 2, 3)]
    tokens[heads_node], tokens[chain[0]], tokens[chain[1]], tokens[chain[2]] = 7, 7, 8, 9
    argmax = [0] * tree.num_nodes
    argmax[0], argmax[chain[0]], argmax[chain[1]], argmax[chain[2]], argmax[heads_node] = 7, 8, 9, 10, 99
    kept, bonus = accept_greedy(tree, tokens, argmax)
    assert kept == chain and bonus == 10


def make_seq(tokens, max_tokens=100, **params):
    params.setdefault("temperature", 0.0)
    seq = Sequence("s", tokens, SamplingParams(max_tokens=max_tokens, **params))
    policy = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05}), max_nodes=64)
    seq.draft = Draft([0] * len(PATHS), list(policy.prior_chances))
    return seq


FLAT = {1: 0.05, 16: 0.055, 64: 0.07, 256: 0.2}
LINEAR = {1: 0.01, 16: 0.16, 64: 0.64, 256: 2.56}
REPEATING = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3, 4]


def test_policy_adds_lookup_only_to_speculating_sequences_within_the_limit():
    cheap = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(FLAT), max_nodes=64, lookup_tokens=8)
    plan = cheap.choose([make_seq(REPEATING)], 0, 1024)
    assert plan.sizes[0] > 1 and plan.lookups[0] == [5, 6, 7, 8, 9, 10, 11, 12]
    tight = cheap.choose([make_seq(REPEATING)], 0, plan.sizes[0] + 2)
    assert tight.trees[0].num_nodes <= plan.sizes[0] + 2               # heads' nodes and chain share the limit
    near_the_end = cheap.choose([make_seq(REPEATING, max_tokens=3)], 0, 1024)
    assert len(near_the_end.lookups[0]) <= 2
    plain = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05, 64: 0.05}), max_nodes=64, fixed_size=1,
                              lookup_tokens=8)
    assert plain.choose([make_seq(REPEATING)], 0, 1024).lookups == [[]]
    off = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05, 64: 0.05}), max_nodes=64)
    assert off.choose([make_seq(REPEATING)], 0, 1024).lookups == [[]]


def test_a_plainly_decoding_sequence_gets_a_chain_only_when_it_pays():
    """Heads that never hit keep a sequence plain; its lookup chain still runs while the
    chain's tokens are likely enough to be worth their cost."""
    flat = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(FLAT), max_nodes=64, lookup_tokens=8)
    linear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(LINEAR), max_nodes=64, lookup_tokens=8)
    seq = make_seq(REPEATING)
    seq.spec.skill = 0.01    # heads that never hit: no tree
    plan = flat.choose([seq], 0, 1024)
    assert plan.sizes == [1] and plan.lookups == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert linear.choose([seq], 0, 1024).lookups == [[]]        # 9 tokens cost 9x one
    for _ in range(20):
        seq.spec.record_lookup(8, 0)                               # chains that never hit stop
    assert flat.choose([seq], 0, 1024).lookups == [[]]
    fixed = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05, 64: 0.05}), max_nodes=64, fixed_size=1,
                              lookup_tokens=8)
    assert fixed.choose([make_seq(REPEATING)], 0, 1024).lookups == [[]]   # plain decoding stays plain


def test_a_chain_is_cut_where_its_tokens_stop_paying():
    """A chain whose first three tokens usually come true and the rest rarely, where 4 tokens
    cost what one does and 8 cost 1.6x: the step verifies the first three only."""
    knee = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel({1: 0.05, 4: 0.0505, 8: 0.08, 64: 0.6}),
                             max_nodes=64, lookup_tokens=8)
    seq = make_seq(REPEATING)
    seq.spec.skill = 0.01
    seq.spec.lookup_survival = [0.9, 0.9, 0.9, 0.05, 0.05, 0.05, 0.05, 0.05]
    assert knee.choose([seq], 0, 1024).lookups == [[5, 6, 7]]


def test_every_chain_is_scored_once_its_text_is_known():
    """A chain left out keeps its chances current too, so chains come back when they would hit."""
    linear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(LINEAR), max_nodes=64, lookup_tokens=4)
    seq = make_seq([3, 4, 5, 6, 7, 8, 3, 4])
    seq.spec.lookup_survival = [0.0] * 4
    assert linear.choose([seq], 0, 1024).lookups == [[]]
    assert list(seq.spec.pending_lookups) == [([5, 6, 7, 8], 7, None)]
    seq.token_ids += [5, 6, 7]
    linear.score_lookups(seq)
    assert seq.spec.lookup_survival == [0.0] * 4              # 3 of 4 tokens known: not yet
    seq.token_ids += [8]
    linear.score_lookups(seq)
    assert seq.spec.lookup_survival == pytest.approx([0.2] * 4)   # all 4 came true
    assert not seq.spec.pending_lookups
    seq.token_ids += [3, 4]
    linear.choose([seq], 0, 1024)                              # [5, 6, 7, 8] again, but the text turns
    seq.token_ids += [5, 9, 9, 9]
    linear.score_lookups(seq)
    assert seq.spec.lookup_survival == pytest.approx([0.36, 0.16, 0.16, 0.16])


def test_a_chain_counts_only_where_the_heads_do_not_reach_already():
    """The heads' branch and the chain are alternatives (a step keeps the longer match): a
    chain token at a depth the heads reach with chance 0.75 adds a quarter of its own."""
    from server.speculation_policy import _candidates
    # heads' nodes: depth 1 (0.6), depth 1 (0.15), depth 2 (0.4); a chain of 0.5, 0.4, 0.3, 0.2, 0.1, 0.1
    candidates = _candidates([0, 1, 2], [0.6, 0.15, 0.4], [7] * 6, [0.5, 0.4, 0.3, 0.2, 0.1, 0.1], [1, 1, 2])
    assert candidates.chain_value(0, 2, 1.0) == pytest.approx(0.9)            # no heads: all of it
    assert candidates.chain_value(3, 2, 1.0) == pytest.approx(0.5 * 0.25 + 0.4 * 0.6)
    assert candidates.chain_value(3, 6, 1.0) == pytest.approx(0.5 * 0.25 + 0.4 * 0.6 + 0.3 + 0.2 + 0.1 + 0.1)
    assert candidates.chain_value(3, 2, 2.0) == pytest.approx(0.4 * 0.2)      # sure at depth 1: nothing added there
    assert candidates.chain_value(9, 1, 1.0) == candidates.chain_value(3, 1, 1.0)   # a forced size past the nodes


def test_chain_kept_reads_verdicts_where_there_are_some_and_the_text_elsewhere():
    chain = [5, 6, 7, 8]
    assert chain_kept(chain, 9, [5, 6, 0, 0], {}) == (4, 2)                      # the text decides
    assert chain_kept(chain, 9, [5, 0, 0, 0], {(11, 6): True}) == (2, 2)         # acceptable, then unknown
    assert chain_kept(chain, 9, [5, 6, 7, 8], {(11, 6): False}) == (4, 1)        # drawn, but not acceptable
    assert chain_kept(chain, 9, [5, 6], {}) == (2, 2)                            # the text ends


def test_sampled_text_scores_a_chain_by_what_typical_acceptance_would_keep():
    """At temperature > 0 the policy asks each step to test the tokens its pending chains
    expect next; a chain whose token was acceptable counts as kept though the draw went
    elsewhere, and one whose token was not counts as lost though the draw matched."""
    linear = SpeculationPolicy(PATHS, ACCURACIES, StepCostModel(LINEAR), max_nodes=64, lookup_tokens=4)
    seq = make_seq([3, 4, 5, 6, 7, 8, 3, 4], temperature=0.7)
    seq.spec.lookup_survival = [0.0] * 4
    plan = linear.choose([seq], 0, 1024)
    assert plan.lookups == [[]] and 5 in plan.trees[0].probes      # left out, but tested
    probes = plan.trees[0].probes
    linear.record_verdicts(seq, probes, [token == 5 for token in probes])   # as the engine does
    seq.token_ids += [9, 9, 9, 9]                                   # the draw went elsewhere
    linear.score(seq)
    assert seq.spec.lookup_survival == pytest.approx([0.2, 0.0, 0.0, 0.0])   # one known token, kept
    assert not seq.spec.probe_verdicts                              # nothing left to ask for
    greedy = make_seq([3, 4, 5, 6, 7, 8, 3, 4])
    assert linear.choose([greedy], 0, 1024).trees[0].probes == ()   # greedy text is its own yardstick
