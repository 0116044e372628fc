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


def path_chance(path: Path, accuracies: list[list[float]]) -> float:
    """A path's chance to be kept under independent heads with these top-k accuracies."""
    chance = 1.0
    for depth, rank in enumerate(path):
        chance *= accuracies[depth][rank] if depth < len(accuracies) and rank < len(accuracies[depth]) else 0.0
    return chance


def expected_accept_length(paths: list[Path], accuracies: list[list[float]]) -> float:
    """1 + sum of each node's acceptance chance under independent heads."""
    return 1.0 + sum(path_chance(path, accuracies) for path in paths)


@lru_cache(maxsize=1024)
def tree_of(paths: tuple[Path, ...], num_nodes: int) -> Tree:
    """The tree made of the first num_nodes - 1 of an expansion-ordered path list."""
    return Tree.from_paths(paths[: num_nodes - 1])


@lru_cache(maxsize=4096)
def _tree(paths: tuple[Path, ...]) -> Tree:
    return Tree.from_paths(paths)


def best_nodes(chances: list[float], count: int) -> list[int]:
    """The `count` most likely paths of a draft (indices into its tree paths), in path order.

    A path's chance is never above its parent's and a parent comes before its children in the
    expansion-ordered paths, so ranking by chance (ties by path order) never picks a node
    without its parent: every count gives a tree, the likeliest of its size.
    """
    if count <= 0:
        return []
    ranked = heapq.nsmallest(count, range(len(chances)), key=lambda j: (-chances[j], j))
    return sorted(ranked)


@dataclass(frozen=True)
class StepTree:
    """What one sequence verifies in a step: the tree, its tokens, and where they came from."""
    tree: Tree
    tokens: tuple[int, ...]          # per node, the root (the sequence's last token) first
    head_paths: tuple[Path, ...] = ()  # the heads' nodes (tree-path entries), for scoring their branch
    head_tokens: tuple[int, ...] = ()
    lookup: tuple[int, ...] = ()     # the context-lookup chain merged in (its tokens from depth 1)
    expected: float = 0.0            # the heads' own estimate of their tokens kept (sum of chances)
    probes: tuple[int, ...] = ()     # tokens whose typical-acceptance verdict at the root the policy
                                     # wants: what its unverified shadow trees and chains expect next

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes


def step_tree(root: int, head_paths: tuple[Path, ...] = (), head_tokens: tuple[int, ...] = (),
              lookup: tuple[int, ...] = (), expected: float = 0.0, probes: tuple[int, ...] = ()) -> StepTree:
    """The tree of the heads' nodes (an ancestor-closed set of paths and their tokens) with a
    context-lookup chain merged in: the chain follows the heads' nodes while their tokens
    agree (no node twice) and hangs its remaining tokens under the last one it reached, as
    paths that continue with LOOKUP_RANK."""
    token_of = dict(zip(head_paths, head_tokens))
    prefix: Path = ()
    depth = 0
    while depth < len(lookup):
        child = next((p for p in head_paths if len(p) == depth + 1 and p[:-1] == prefix
                      and token_of[p] == lookup[depth]), None)
        if child is None:
            break
        prefix, depth = child, depth + 1
    chain = tuple(prefix + (LOOKUP_RANK,) * k for k in range(1, len(lookup) - depth + 1))
    tree = _tree(tuple(head_paths) + chain)
    tokens = tuple([root] + [token_of[p] if LOOKUP_RANK not in p else lookup[len(p) - 1] for p in tree.paths[1:]])
    return StepTree(tree, tokens, tuple(head_paths), tuple(head_tokens), tuple(lookup), expected, probes)


def kept_by_tree(paths: tuple[Path, ...], draft: list[int], future: list[int]) -> int:
    """Drafted tokens a tree made of `paths` would have kept had the text gone on with
    `future`: the deepest path whose tokens match. draft[j] is the token of paths[j] (the
    layout of server/drafter.py; extra draft tokens are ignored)."""
    return kept_below(children_by_token(paths, draft), future)


def children_by_token(paths: tuple[Path, ...], tokens: list[int]) -> dict[Path, dict[int, Path]]:
    """Per node (the root is ()), its children by token (the first of equal siblings)."""
    children: dict[Path, dict[int, Path]] = {}
    for path, token in zip(paths, tokens):
        children.setdefault(path[:-1], {}).setdefault(token, path)
    return children


def kept_below(children: dict[Path, dict[int, Path]], future: list[int], verdict=None) -> int:
    """Drafted tokens of a tree (children_by_token) kept had the text gone on with `future`.
    verdict(depth, token), where given, is typical acceptance's verdict on `token` as the
    tree's depth-th kept token (None: unknown, then the text decides): a tree keeps an
    acceptable child even where the sampled text took another, and the text tells no more."""
    def acceptable(depth: int, t: int, drawn: int) -> bool:
        said = verdict(depth, t) if verdict is not None else None
        return t == drawn if said is None else said

    node: Path = ()
    for depth, token in enumerate(future):
        below = children.get(node)
        if not below:
            return depth
        if token in below and acceptable(depth, token, token):
            node = below[token]
        else:
            return depth + any(acceptable(depth, t, token) for t in below)
    return len(future)
