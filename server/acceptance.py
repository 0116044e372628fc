"""Which drafted tree tokens a sequence keeps, and the bonus token after them.

One function per rule, each taking a sequence's verified tree:
- greedy (temperature 0): walk down from the root, following the child whose token equals
  the base model's argmax at its parent. The output is exactly plain greedy decoding.
- typical (Medusa): a child x of node u is acceptable when p_u(x) > min(epsilon,
  delta * exp(-H(p_u))); keep the longest acceptable root-to-node path. Fast, not lossless.
- rejection: recursive rejection sampling along the tree; lossless at any temperature.
The bonus token comes from the same forward: the argmax (greedy) or a draw from the base
distribution (typical) at the last kept node.
"""
from __future__ import annotations

import torch

from server.sampler import sample
from server.sampling_params import SamplingParams
from server.tree import Tree


def accept_greedy(tree: Tree, node_tokens: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """argmax[i]: the base model's choice after node i. Returns (kept nodes after the root, bonus).

    Siblings may carry the same token (a lookup chain beside the heads' guesses): every
    matching child is followed and the longest kept path wins.
    """
    children = tree.child_ranks()

    def longest(node: int) -> list[int]:
        best: list[int] = []
        for child in children.get(node, {}).values():
            if node_tokens[child] == argmax[node]:
                path = [child] + longest(child)
                if len(path) > len(best):
                    best = path
        return best

    kept = longest(0)
    return kept, argmax[kept[-1] if kept else 0]


def typical_acceptable(probs: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor,
                       epsilon: float, delta: float) -> torch.Tensor:
    """probs [n, vocab] per node; parents, tokens [n - 1] for nodes 1..n-1 -> bool [n - 1]."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)          # [n]
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    return probs[parents, tokens] > threshold[parents]


def typical_verdicts(probs: torch.Tensor, params: SamplingParams, tokens: tuple[int, ...]) -> list[bool]:
    """probs [vocab] at one node (server/sampler.py, `probabilities`): whether typical
    acceptance would keep each of `tokens` as its child (how the policy scores the shadow
    trees and lookup chains that no tree verified)."""
    parents = torch.zeros(len(tokens), dtype=torch.long, device=probs.device)
    return typical_acceptable(torch.atleast_2d(probs), parents, torch.tensor(tokens, device=probs.device),
                              params.typical_epsilon, params.typical_delta).tolist()


def accept_typical(tree: Tree, node_tokens: list[int], probs: torch.Tensor, params: SamplingParams,
                   generator: torch.Generator | None) -> tuple[list[int], int]:
    """probs [n, vocab] for the tree's nodes (server/sampler.py, `probabilities`). Returns
    (kept nodes after the root, bonus token)."""
    kept: list[int] = []
    if tree.num_nodes > 1:
        device = probs.device
        parents = torch.tensor(tree.parents[1:], device=device)
        tokens = torch.tensor(node_tokens[1:], device=device)
        ok = [True] + typical_acceptable(probs, parents, tokens, params.typical_epsilon,
                                         params.typical_delta).tolist()
        for leaf in tree.leaves:
            run = []
            for node in leaf[1:]:
                if not ok[node]:
                    break
                run.append(node)
            if len(run) > len(kept):
                kept = run
    last = kept[-1] if kept else 0
    bonus = int(sample(probs[last:last + 1], generator)[0])
    return kept, bonus


def accept_rejection(tree: Tree, node_tokens: list[int], probs: torch.Tensor, params: SamplingParams,
                     generator: torch.Generator | None) -> tuple[list[int], int]:
    """Lossless: recursive rejection sampling along the tree (SpecInfer-style); probs [n,
    vocab] for the tree's nodes (server/sampler.py, `probabilities`).

    The heads' guesses are deterministic drafts, so child x of node u is accepted with
    probability p_u(x); on rejection x is removed from p_u (the residual, renormalized) and
    the next sibling is tried; when all fail the bonus is drawn from the residual. Each
    emitted token is then distributed exactly as the base model's sampling distribution.
    """
    children = tree.child_ranks()
    kept: list[int] = []
    node = 0
    while True:
        residual = probs[node].clone()
        chosen = None
        for rank in sorted(children.get(node, {})):
            child = children[node][rank]
            token = node_tokens[child]
            draw = torch.rand(1, generator=generator, device=residual.device)
            if float(draw) < float(residual[token]):
                chosen = child
                break
            residual[token] = 0.0
            total = residual.sum()
            if float(total) <= 0.0:
                break
            residual /= total
        if chosen is None:
            return kept, int(sample(residual[None], generator)[0])
        kept.append(chosen)
        node = chosen
