"""Candidate trees: which of the heads' top-k guesses are verified together, and how.

A tree is written as Medusa writes it: a list of paths of top-k ranks, e.g. (0,) is head 0's
best guess, (0, 2) is head 1's third guess following it. Node 0 is the root: the token the
base model chose last, whose key and value are not in the cache yet. A node at depth d sits
at position `num_cached + d` and sees its ancestors and itself only.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import lru_cache

Path = tuple[int, ...]
# A path that starts with LOOKUP_RANK is a node of the context-lookup chain (server/lookup.py):
# (LOOKUP_RANK,) * d is its d-th token, hung under the root beside the heads' guesses.
LOOKUP_RANK = -1


@dataclass(frozen=True)
class Tree:
    """A frozen candidate tree; node 0 is the root, every node's parent comes before it."""
    paths: tuple[Path, ...]          # per node (root: ()), ranks from the root down
    parents: tuple[int, ...]         # per node; -1 for the root
    depths: tuple[int, ...]
    ancestor_masks: tuple[int, ...]  # per node: bit j set = node j is an ancestor or itself
    leaves: tuple[tuple[int, ...], ...]  # per leaf: the node indices from the root to it

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @classmethod
    def from_paths(cls, paths: list[Path] | tuple[Path, ...]) -> "Tree":
        """Build from top-k paths (root excluded); sorted by depth so parents come first."""
        ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        index = {(): 0}
        parents, masks = [-1], [1]
        for i, path in enumerate(ordered, start=1):
            if not path or path[:-1] not in index:
                raise ValueError(f"tree path {path} has no parent path {path[:-1]} in the tree")
            parent = index[path[:-1]]
            index[path] = i
            parents.append(parent)
            masks.append(masks[parent] | (1 << i))
        all_paths = [()] + ordered
        has_child = set(parents)
        leaves = []
        for node in range(len(all_paths)):
            if node not in has_child:
                chain = [node]
                while parents[chain[-1]] != -1:
                    chain.append(parents[chain[-1]])
                leaves.append(tuple(reversed(chain)))
        return cls(tuple(all_paths), tuple(parents), tuple(len(p) for p in all_paths),
                   tuple(masks), tuple(leaves))

    def child_ranks(self) -> dict[int, dict[int, int]]:
        """node -> {top-k rank: child node}."""
        out: dict[int, dict[int, int]] = {}
        for node, path in enumerate(self.paths[1:], start=1):
            out.setdefault(self.parents[node], {})[path[-1]] = node
        return out


def expand_tree(accuracies: list[list[float]], num_nodes: int) -> list[Path]:
    """The paths of the tree with `num_nodes` nodes (root included) of highest expected gain.

    `accuracies[k][r]` is how often head k's rank-r guess is the right token. Assuming heads
    are independent, a path's chance to be accepted is the product of its ranks' accuracies,
    and the expected accepted length is 1 + the sum over nodes of those chances. Greedy
    expansion (as in the Medusa paper) adds the most likely node whose parent is present;
    since a child is never likelier than its parent, every prefix of the returned list is
    itself the best tree of that size.
    """
    if num_nodes < 1:
        raise ValueError("a tree has at least the root")
    heap: list[tuple[float, Path]] = [(-accuracies[0][r], (r,)) for r in range(len(accuracies[0]))]
    heapq.heapify(heap)
    chosen: list[Path] = []
    while heap and len(chosen) < num_nodes - 1:
        negative, path = heapq.heappop(heap)
        chosen.append(path)
        depth = len(path)
        if depth < len(accuracies):
            for r, acc in enumerate(accuracies[depth]):
                heapq.heappush(heap, (negative * acc, path + (r,)))
    return chosen


def expected_accept_length(paths: list[Path], accuracies: list[list[float]]) -> float:
    """1 + sum of each node's acceptance chance under independent heads."""
    total = 1.0
    for path in paths:
        chance = 1.0
        for depth, rank in enumerate(path):
            chance *= accuracies[depth][rank] if rank < len(accuracies[depth]) else 0.0
        total += chance
    return total


@lru_cache(maxsize=1024)
def tree_of(paths: tuple[Path, ...], num_nodes: int, lookup: int = 0) -> Tree:
    """The tree made of the first num_nodes - 1 of an expansion-ordered path list, plus a
    lookup chain of `lookup` nodes under the root (num_nodes + lookup nodes in all)."""
    return Tree.from_paths(paths[: num_nodes - 1] + tuple((LOOKUP_RANK,) * d for d in range(1, lookup + 1)))


def kept_by_tree(paths: tuple[Path, ...], draft: list[int], future: list[int]) -> int:
    """Drafted tokens a greedy tree made of `paths` would have kept had the text gone on with
    `future`: the deepest path whose tokens match. draft[j] is the token of paths[j] (the
    layout of server/drafter.py; extra draft tokens are ignored)."""
    token_of = dict(zip(paths, draft))
    kept, prefix = 0, ()
    for token in future:
        child = next((p for p in token_of if len(p) == kept + 1 and p[:-1] == prefix and token_of[p] == token), None)
        if child is None:
            break
        prefix, kept = child, kept + 1
    return kept
