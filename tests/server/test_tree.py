"""Candidate trees: buffers against a brute-force construction, and the greedy expansion."""
import itertools
import random

import pytest

from server.acceptance import accept_greedy
from server.tree import LOOKUP_RANK, Tree, best_nodes, expand_tree, expected_accept_length, step_tree, tree_of

ACCURACIES = [[0.6, 0.15, 0.06, 0.03], [0.4, 0.1, 0.05], [0.3, 0.08, 0.04], [0.2, 0.06]]


def brute_force(paths):
    """Node order: root then by (depth, path); a node sees exactly the nodes that prefix it."""
    nodes = [()] + sorted(set(paths), key=lambda p: (len(p), p))
    visible = [[nodes[j] == nodes[i][:len(nodes[j])] for j in range(len(nodes))] for i in range(len(nodes))]
    return nodes, visible


@pytest.mark.parametrize("seed", range(10))
def test_tree_buffers_match_brute_force(seed):
    rng = random.Random(seed)
    paths = set()
    for _ in range(rng.randrange(1, 40)):
        path = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 5)))
        paths.update(path[:d] for d in range(1, len(path) + 1))
    tree = Tree.from_paths(list(paths))
    nodes, visible = brute_force(paths)
    assert list(tree.paths) == nodes
    for i in range(tree.num_nodes):
        assert [bool(tree.ancestor_masks[i] >> j & 1) for j in range(tree.num_nodes)] == visible[i]
        assert tree.depths[i] == len(nodes[i])
        if i:
            assert nodes[tree.parents[i]] == nodes[i][:-1] and tree.parents[i] < i
    leaves = {tree.paths[leaf[-1]] for leaf in tree.leaves}
    assert leaves == {p for p in nodes if not any(q[:len(p)] == p and q != p for q in nodes)}
    for leaf in tree.leaves:
        assert [tree.paths[n] for n in leaf] == [tree.paths[leaf[-1]][:d] for d in range(len(leaf))]


def test_missing_parent_is_refused():
    with pytest.raises(ValueError, match="no parent"):
        Tree.from_paths([(0,), (1, 0)])


@pytest.mark.parametrize("budget", [1, 2, 4, 8, 16, 32, 64])
def test_expansion_respects_budget_and_parents(budget):
    paths = expand_tree(ACCURACIES, budget)
    assert len(paths) == budget - 1
    assert all(len(p) == 1 or p[:-1] in paths for p in paths)
    assert all(len(p) <= len(ACCURACIES) for p in paths)
    Tree.from_paths(paths)


def test_expected_length_grows_with_budget_and_prefixes_are_optimal():
    paths = expand_tree(ACCURACIES, 64)
    lengths = [expected_accept_length(paths[: n - 1], ACCURACIES) for n in (1, 4, 8, 16, 32, 64)]
    assert lengths == sorted(lengths) and lengths[0] == 1.0 and lengths[-1] > lengths[1]
    # for a small budget, greedy expansion equals the exhaustive optimum over valid trees
    candidates = [p for d in range(1, 4) for p in itertools.product(range(3), repeat=d)]
    best = 0.0
    for combo in itertools.combinations(candidates, 4):
        if all(len(p) == 1 or p[:-1] in combo for p in combo):
            best = max(best, expected_accept_length(list(combo), ACCURACIES))
    assert expected_accept_length(paths[:4], ACCURACIES) == pytest.approx(best)


def test_tree_of_takes_prefixes():
    paths = tuple(expand_tree(ACCURACIES, 64))
    assert tree_of(paths, 1).num_nodes == 1
    assert tree_of(paths, 16).paths[1:] == tuple(sorted(paths[:15], key=lambda p: (len(p), p)))


@pytest.mark.parametrize("seed", range(5))
def test_best_nodes_are_the_likeliest_and_form_a_tree(seed):
    """Chances that shrink along every path (as products of probabilities do): the n best
    nodes are the n likeliest, and always a tree (every parent present), ties included."""
    rng = random.Random(seed)
    paths = expand_tree(ACCURACIES, 40)
    chance = {}
    for path in paths:   # parents come first in an expansion-ordered list
        parent = chance.get(path[:-1], 1.0)
        chance[path] = parent * rng.choice([1.0, 0.9, 0.5, 0.1])   # 1.0: a child as likely as its parent
    chances = [chance[p] for p in paths]
    for count in range(len(paths) + 1):
        nodes = best_nodes(chances, count)
        assert nodes == sorted(nodes) and len(nodes) == count
        chosen = {paths[j] for j in nodes}
        assert all(len(p) == 1 or p[:-1] in chosen for p in chosen)
        left_out = [chances[j] for j in range(len(paths)) if j not in nodes]
        assert not left_out or min((chances[j] for j in nodes), default=1.0) >= max(left_out)


def test_a_lookup_chain_follows_the_heads_nodes_it_agrees_with():
    """The chain [7, 8, 9, 4] agrees with the heads' (0,) -> 7 and (0, 0) -> 8 and leaves
    them at (0, 0, 0) -> 5: its tokens 9, 4 hang under (0, 0) and no token appears twice
    at one place; tokens, depths and masks follow."""
    paths, tokens = ((0,), (1,), (0, 0), (0, 0, 0)), (7, 3, 8, 5)
    st = step_tree(42, paths, tokens, (7, 8, 9, 4), expected=1.5)
    tree = st.tree
    assert st.num_nodes == 7 and st.tokens[0] == 42
    assert set(tree.paths[1:]) == set(paths) | {(0, 0, LOOKUP_RANK), (0, 0, LOOKUP_RANK, LOOKUP_RANK)}
    by_path = dict(zip(tree.paths, st.tokens))
    assert by_path[(0, 0, LOOKUP_RANK)] == 9 and by_path[(0, 0, LOOKUP_RANK, LOOKUP_RANK)] == 4
    assert [by_path[p] for p in paths] == list(tokens)
    # greedy verification keeps the chain's whole text when the model agrees with it
    argmax = [0] * st.num_nodes
    for node, path in enumerate(tree.paths):
        argmax[node] = {(): 7, (0,): 8, (0, 0): 9, (0, 0, LOOKUP_RANK): 4}.get(path, 0)
    kept, bonus = accept_greedy(tree, list(st.tokens), argmax)
    assert [st.tokens[k] for k in kept] == [7, 8, 9, 4] and bonus == 0


def test_a_chain_that_disagrees_at_once_hangs_under_the_root():
    st = step_tree(1, ((0,),), (7,), (6, 5))
    assert st.tree.paths == ((), (LOOKUP_RANK,), (0,), (LOOKUP_RANK, LOOKUP_RANK))
    assert st.tokens == (1, 6, 7, 5)
    plain = step_tree(1)
    assert plain.num_nodes == 1 and plain.tokens == (1,)
