"""Drafting: the heads' guesses laid out on the candidate tree for the next step.

A draft holds one token per path of the expansion-ordered tree (`tree_paths`, server/tree.py),
in that order, with the heads' own estimate of each path's chance to come true: the product
of the heads' softmax probabilities along it. The speculation policy verifies a
sequence's likeliest nodes, so the tree changes with what the heads are sure of at each step
(a confident run of code gets a deep chain, an open choice in prose a few siblings).

Independent heads (Medusa's, with or without the next token's embedding) guess every depth
from the same hidden state in one call, so their draft always covers all the paths: a
path's token is its last rank's guess of the head at its depth. Chained heads
(models/heads.py) extend each path from its parent's output and its own token, depth by
depth, so a draft costs one head call per tree node that has children; `draft` fills only
the first `size` - 1 paths, the tree of that size the policy asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from models.cpu_decoder import build_cpu_heads
from models.heads import MedusaHeads
from models.llama import LlamaForCausalLM
from server.step_graphs import DraftGraphs
from server.tree import Path, tree_of


@dataclass(frozen=True)
class Draft:
    """The heads' guesses for one sequence's next tree, laid out on the tree paths.

    tokens[j] is the guess for tree_paths[j]; chances[j] is the heads' own estimate that the
    whole path comes true: the product of each head's softmax probability of its guess along
    the path (heads guess independently). A child's chance never exceeds its parent's, so
    the nodes sorted by chance (ties in path order) give, at every length, an ancestor-closed
    tree: the most promising one of that size for this very step (server/tree.py, `best_nodes`).
    """
    tokens: list[int]
    chances: list[float]

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter:
    def __init__(self, heads: MedusaHeads, model: LlamaForCausalLM, tree_paths: tuple[Path, ...],
                 graph_rows: int = 0, capture: bool | None = None):
        """graph_rows > 0: independent heads' guesses for up to that many rows are replayed
        from CUDA graphs (server/step_graphs.py); capture (default: on CUDA) False pads
        them the same way but runs them eagerly (tests)."""
        self.heads = heads
        self.model = model
        self.tree_paths = tree_paths
        self.device = model.lm_head.weight.device
        self.top_k = 1 + max((rank for path in tree_paths for rank in path), default=0)
        self.chained = heads.config.chained
        # per path: its parent's index (-1: the root), the head (depth - 1) and the rank that
        # guess its token; visited shallowest first (a parent before its children)
        index = {path: j for j, path in enumerate(tree_paths)}
        self._steps = [(j, index[path[:-1]] if len(path) > 1 else -1, len(path) - 1, path[-1])
                       for j, path in sorted(enumerate(tree_paths), key=lambda item: len(item[1]))]
        self._cpu_heads = None   # (the draft unembedding it was built for, (CpuHeads, draft vocabulary) or None)
        self.graphs = None
        if graph_rows and not self.chained:
            self.graphs = DraftGraphs(self._guesses, self._weights, model.config.hidden_size,
                                      model.lm_head.weight.dtype, graph_rows, self.device,
                                      self.device.type == "cuda" if capture is None else capture)
            self.graphs.warm_up()

    def draft(self, hidden: torch.Tensor, next_ids: list[int], sizes: list[int]) -> list[Draft]:
        """hidden [N, H]: the state of each sequence's last kept token; next_ids: the token the
        base model picked from it (the next tree's root); sizes: tree nodes to fill per row."""
        if not self.chained:
            if self.graphs is not None and self.graphs.fits(len(next_ids)):
                return self._lay_out(*self.graphs.run(hidden, next_ids))
            return self._lay_out(*self._guesses(hidden, torch.tensor(next_ids, device=self.device)))
        next_embeds = self._embed(next_ids, hidden.dtype) if self.heads.config.token_input else None
        return self._draft_chained(hidden, next_embeds, sizes)

    def _guesses(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent heads: (probabilities, token ids) of each head's top-k [N, heads, k];
        on the CPU kernels in one C++ call (the same bits)."""
        next_embeds = None
        if self.heads.config.token_input:
            next_embeds = self.model.model.embed_tokens(next_ids).to(hidden.dtype)
        cpu_heads = self._cpu_draft() if hidden.device.type == "cpu" else None
        if cpu_heads is not None:
            heads, vocab = cpu_heads
            probs, indices = heads.top_guesses(hidden, next_embeds, self.top_k)
            return probs, vocab[indices]
        return self.heads.top_guesses(self.heads(hidden, next_embeds), self.model.lm_head, self.top_k)

    def _cpu_draft(self):
        """(CpuHeads, draft vocabulary) for these heads as they are now, or None (models/cpu_decoder.py)."""
        if self.heads.draft_vocab is None or self.heads.config.chained:
            return None
        unembedding = self.heads.draft_unembedding(self.model.lm_head)[0]
        if self._cpu_heads is None or self._cpu_heads[0] is not unembedding:
            self._cpu_heads = (unembedding, build_cpu_heads(self.heads, self.model.lm_head))
        return self._cpu_heads[1]

    def _weights(self) -> list[torch.Tensor]:
        """Every tensor `_guesses` reads besides its inputs."""
        tensors = [*self.heads.parameters(), self.model.lm_head.weight, self.model.model.embed_tokens.weight]
        if self.heads.draft_vocab is not None:
            unembedding, vocab = self.heads.draft_unembedding(self.model.lm_head)
            tensors += [*unembedding.parameters(), *unembedding.buffers(), vocab]
        return tensors

    def _lay_out(self, probs: torch.Tensor, ids: torch.Tensor) -> list[Draft]:
        """Independent heads' top-k [N, heads, k] -> each row's guess and chance per path: its
        parent's chance times its own guess's probability (so never above its parent's). Plain
        Python over the 63 paths: a few dozen tensor operations cost more at these sizes."""
        drafts = []
        for row_probs, row_ids in zip(probs.tolist(), ids.tolist()):
            chances, tokens = [0.0] * len(self._steps), [0] * len(self._steps)
            for j, parent, head, rank in self._steps:
                p = row_probs[head][rank]
                chances[j] = p if parent < 0 else chances[parent] * p
                tokens[j] = row_ids[head][rank]
            drafts.append(Draft(tokens, chances))
        return drafts

    def _embed(self, token_ids: list[int], dtype: torch.dtype) -> torch.Tensor:
        return self.model.model.embed_tokens(torch.tensor(token_ids, device=self.device)).to(dtype)

    def _draft_chained(self, hidden: torch.Tensor, next_embeds: torch.Tensor, sizes: list[int]) -> list[Draft]:
        """Depth by depth: head d runs on every node at depth d that has children in its
        sequence's tree (all sequences together), and its top-k fill those children."""
        sizes = [max(1, min(size, len(self.tree_paths) + 1)) for size in sizes]
        drafts = [Draft([0] * (size - 1), [0.0] * (size - 1)) for size in sizes]
        frontier = [(row, 0, 1.0) for row, size in enumerate(sizes) if size > 1]   # (row, tree node, chance)
        if not frontier:
            return drafts
        keep = torch.tensor([row for row, _, _ in frontier], device=self.device)
        state, token_embeds = hidden[keep], next_embeds[keep]
        for depth in range(self.heads.config.num_heads):
            state = self.heads.step(depth, state, token_embeds)
            probs, ids = self.heads.top_guesses(state, self.model.lm_head, self.top_k)
            probs, ids = probs.tolist(), ids.tolist()
            next_frontier, parents, tokens = [], [], []
            for m, (row, node, chance) in enumerate(frontier):
                children, has_children, slots = _layout(self.tree_paths, sizes[row])
                for rank, child in children.get(node, {}).items():
                    token, child_chance = ids[m][rank], chance * probs[m][rank]
                    drafts[row].tokens[slots[child]] = token
                    drafts[row].chances[slots[child]] = child_chance
                    if child in has_children:
                        next_frontier.append((row, child, child_chance))
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
    index = {path: j for j, path in enumerate(tree_paths)}
    slots = [-1] + [index[path] for path in tree.paths[1:]]
    return tree.child_ranks(), frozenset(p for p in tree.parents if p >= 0), slots
