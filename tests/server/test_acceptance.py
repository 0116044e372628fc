"""The acceptance rules on hand-made distributions."""
import math

import torch

from server.acceptance import accept_greedy, accept_typical, typical_acceptable, typical_verdicts
from server.sampler import make_generator, probabilities
from server.sampling_params import SamplingParams
from server.tree import Tree

# root -> (0,) -> (0,0); root -> (1,) ; nodes in order: root, (0,), (1,), (0,0)
TREE = Tree.from_paths([(0,), (1,), (0, 0)])


def test_greedy_follows_the_argmax_chain():
    tokens = [5, 7, 8, 9]           # root, (0,), (1,), (0,0)
    assert accept_greedy(TREE, tokens, [7, 9, 0, 4]) == ([1, 3], 4)
    assert accept_greedy(TREE, tokens, [8, 0, 2, 0]) == ([2], 2)    # the second rank matched
    assert accept_greedy(TREE, tokens, [6, 0, 0, 0]) == ([], 6)     # nothing: the bonus only


def one_hot_like(vocab, probs: dict[int, float]):
    p = torch.full((vocab,), 1e-9)
    for k, v in probs.items():
        p[k] = v
    return torch.log(p / p.sum())


def test_typical_threshold_depends_on_entropy():
    confident = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    flat = torch.full((1, 4), 0.25)
    parents = torch.tensor([0])
    # confident parent: threshold min(0.09, 0.3 * exp(-H)) ~ 0.09 -> 0.05 rejected
    h = -(confident * confident.log()).sum()
    assert 0.3 * math.exp(-h) > 0.09
    assert not typical_acceptable(torch.cat([confident, confident]), parents, torch.tensor([1]), 0.09, 0.3)[0]
    # flat parent: threshold 0.3 * exp(-log 4) = 0.075 -> 0.25 accepted
    assert typical_acceptable(torch.cat([flat, flat]), parents, torch.tensor([3]), 0.09, 0.3)[0]


def test_typical_keeps_the_longest_acceptable_path_and_samples_the_bonus():
    vocab = 10
    tokens = [5, 7, 8, 9]
    logits = torch.stack([
        one_hot_like(vocab, {7: 0.5, 8: 0.5}),   # root: both children acceptable
        one_hot_like(vocab, {9: 0.9, 1: 0.1}),   # (0,): its child 9 acceptable
        one_hot_like(vocab, {3: 1.0}),
        one_hot_like(vocab, {4: 1.0}),           # after (0,0): the bonus must be 4
    ])
    params = SamplingParams(temperature=1.0, seed=0)
    kept, bonus = accept_typical(TREE, tokens, probabilities(logits, params), params, make_generator(params))
    assert kept == [1, 3] and bonus == 4


def test_typical_rejects_unlikely_drafts():
    vocab = 10
    tokens = [5, 7, 8, 9]
    logits = torch.stack([one_hot_like(vocab, {2: 0.98, 7: 0.01, 8: 0.01})] * 4)
    params = SamplingParams(temperature=1.0, seed=0)
    kept, bonus = accept_typical(TREE, tokens, probabilities(logits, params), params, make_generator(params))
    assert kept == [] and bonus in (2, 7, 8)


def test_rejection_sampling_is_lossless():
    """Whatever the drafts, the first emitted token follows the base distribution exactly."""
    from server.acceptance import accept_rejection

    vocab = 6
    target = {0: 0.1, 1: 0.5, 2: 0.25, 3: 0.15}
    root_logits = one_hot_like(vocab, target)
    logits = torch.stack([root_logits] + [one_hot_like(vocab, {4: 1.0})] * 3)
    tokens = [5, 2, 3, 1]            # drafts: (0,) -> 2, (1,) -> 3, (0,0) -> 1
    params = SamplingParams(temperature=1.0, seed=0)
    generator = make_generator(params)
    counts = torch.zeros(vocab)
    trials = 3000
    for _ in range(trials):
        kept, bonus = accept_rejection(TREE, tokens, probabilities(logits, params), params, generator)
        first = tokens[kept[0]] if kept else bonus
        counts[first] += 1
        if kept:
            assert kept[0] in (1, 2)
    expected = torch.tensor([target.get(i, 0.0) for i in range(vocab)])
    assert torch.allclose(counts / trials, expected, atol=0.035)


def test_verdicts_on_probes_match_what_a_tree_would_keep():
    """The policy's test of a chain token at a plain step's root is the tree's own rule."""
    params = SamplingParams(temperature=1.0)
    probs = probabilities(one_hot_like(10, {7: 0.6, 8: 0.35, 3: 0.05})[None], params)
    assert typical_verdicts(probs[0], params, (7, 8, 3)) == [True, True, False]
    for token, verdict in ((7, True), (8, True), (3, False)):
        kept, _ = accept_typical(Tree.from_paths([(0,)]), [5, token], torch.cat([probs, probs]), params, None)
        assert (kept == [1]) == verdict
