"""Drafting: the heads' guesses laid out on the candidate tree for the next step.

A draft is one token per path of the expansion-ordered tree (`tree_paths`, whose every
prefix is the best smaller tree, server/tree.py), in that order: `draft[j]` is the guess for
`tree_paths[j]`, and a draft of m tokens can fill any tree of up to m + 1 nodes.

Independent heads (Medusa's, with or without the next token's embedding) guess every depth
from the same hidden state in one call, so their draft always covers the whole tree: a
path's token is its last rank's guess of the head at its depth. Chained heads
(models/heads.py) extend each path from its parent's output and its own token, depth by
depth, so a draft costs one head call per tree node that has children; `draft` fills only
the `size` nodes the speculation policy asked for.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from models.heads import MedusaHeads
from models.llama import LlamaForCausalLM
from server.tree import LOOKUP_RANK, Path, tree_of


class Drafter:
    def __init__(self, heads: MedusaHeads, model: LlamaForCausalLM, tree_paths: tuple[Path, ...]):
        self.heads = heads
        self.model = model
        self.tree_paths = tree_paths
        self.device = model.lm_head.weight.device
        self.top_k = 1 + max((rank for path in tree_paths for rank in path), default=0)
        self.chained = heads.config.chained

    def draft(self, hidden: torch.Tensor, next_ids: list[int], sizes: list[int]) -> list[list[int]]:
        """hidden [N, H]: the state of each sequence's last kept token; next_ids: the token the
        base model picked from it (the next tree's root); sizes: tree nodes to fill per row."""
        next_embeds = None
        if self.heads.config.token_input:
            next_embeds = self._embed(next_ids, hidden.dtype)
        if not self.chained:
            guesses = self.heads.guesses(hidden, self.model.lm_head, self.top_k, next_embeds).tolist()
            return [[rows[len(path) - 1][path[-1]] for path in self.tree_paths] for rows in guesses]
        return self._draft_chained(hidden, next_embeds, sizes)

    def _embed(self, token_ids: list[int], dtype: torch.dtype) -> torch.Tensor:
        return self.model.model.embed_tokens(torch.tensor(token_ids, device=self.device)).to(dtype)

    def _draft_chained(self, hidden: torch.Tensor, next_embeds: torch.Tensor, sizes: list[int]) -> list[list[int]]:
        """Depth by depth: head d runs on every node at depth d that has children in its
        sequence's tree (all sequences together), and its top-k fill those children."""
        sizes = [max(1, min(size, len(self.tree_paths) + 1)) for size in sizes]
        drafts = [[0] * (size - 1) for size in sizes]
        frontier = [(row, 0) for row, size in enumerate(sizes) if size > 1]   # (row, tree node)
        if not frontier:
            return drafts
        keep = torch.tensor([row for row, _ in frontier], device=self.device)
        state, token_embeds = hidden[keep], next_embeds[keep]
        for depth in range(self.heads.config.num_heads):
            state = self.heads.step(depth, state, token_embeds)
            top = self.heads.top_tokens(state, self.model.lm_head, self.top_k).tolist()
            next_frontier, parents, tokens = [], [], []
            for m, (row, node) in enumerate(frontier):
                children, has_children, slots = _layout(self.tree_paths, sizes[row])
                for rank, child in children.get(node, {}).items():
                    token = top[m][rank]
                    drafts[row][slots[child]] = token
                    if child in has_children:
                        next_frontier.append((row, child))
                        parents.append(m)
                        tokens.append(token)
            if not next_frontier:
                break
            frontier = next_frontier
            state = state[torch.tensor(parents, device=self.device)]
            token_embeds = self._embed(tokens, hidden.dtype)
        return drafts


@lru_cache(maxsize=256)
def _layout(tree_paths: tuple[Path, ...], num_nodes: int):
    """For the tree of num_nodes nodes: {node: {rank: child}}, the nodes with children, and
    each node's slot in a draft (its index in tree_paths)."""
    tree = tree_of(tree_paths, num_nodes)
    index = _index(tree_paths)
    slots = [-1] + [index[path] for path in tree.paths[1:]]
    return tree.child_ranks(), frozenset(p for p in tree.parents if p >= 0), slots


def node_tokens(tree_paths: tuple[Path, ...], root: int, draft: list[int] | None, num_nodes: int,
                lookup: list[int] = ()) -> list[int]:
    """The tokens of the tree of num_nodes nodes from the draft (laid out on tree_paths) plus
    a lookup chain (server/lookup.py), in the tree's node order, root first."""
    tree = tree_of(tree_paths, num_nodes, len(lookup))
    index = _index(tree_paths)
    return [root] + [lookup[len(path) - 1] if path[0] == LOOKUP_RANK else draft[index[path]]
                     for path in tree.paths[1:]]


@lru_cache(maxsize=16)
def _index(tree_paths: tuple[Path, ...]) -> dict[Path, int]:
    return {path: j for j, path in enumerate(tree_paths)}
