"""Trees tuned from measured head accuracies (server.tree.expand_tree via tune_tree)."""
import pytest

from models.head_checkpoint import TREE_BUDGETS, prior_accuracies, tune_tree
from server.tree import Tree, expected_accept_length, tree_of

MEASURED = [[0.62, 0.12, 0.05, 0.03, 0.02, 0.01, 0.01, 0.005, 0.005, 0.004],
            [0.40, 0.14, 0.07, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01, 0.005],
            [0.28, 0.12, 0.07, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01, 0.01],
            [0.20, 0.10, 0.06, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01, 0.01]]


@pytest.mark.parametrize("accuracies", [MEASURED, prior_accuracies(4), prior_accuracies(2)])
def test_tuned_trees_respect_budgets_and_parents(accuracies):
    paths, lengths = tune_tree(accuracies)
    assert len(paths) == 63 and len(set(paths)) == 63
    for budget in TREE_BUDGETS:
        tree = tree_of(paths, budget)
        assert isinstance(tree, Tree) and tree.num_nodes == budget
        present = set(tree.paths)
        assert all(path[:-1] in present for path in tree.paths[1:])  # every node's parent is there
        assert tree.max_depth <= len(accuracies)
    values = [lengths[b] for b in TREE_BUDGETS]
    assert all(a < b for a, b in zip(values, values[1:]))  # more nodes, longer expected acceptance
    assert values[0] > 1.0


def test_expected_length_matches_the_path_prefix():
    paths, lengths = tune_tree(MEASURED)
    for budget in TREE_BUDGETS:
        assert lengths[budget] == pytest.approx(expected_accept_length(list(paths[: budget - 1]), MEASURED))


def test_greedy_tree_beats_a_chain_of_the_same_size():
    paths, lengths = tune_tree(MEASURED)
    chain = [(0,), (0, 0), (0, 0, 0)]
    assert lengths[4] >= expected_accept_length(chain, MEASURED)
    assert paths[0] == (0,)
