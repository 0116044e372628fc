"""How well heads guess on the evaluation prompts (not their training distribution).

    python -m benchmarks.head_accuracy [--heads DIR ...] [--max-tokens 128]

The base model answers the chat and code evaluation prompts greedily; each head checkpoint
then guesses, from every answer position, the tokens 2..K+1 ahead, exactly as the server
drafts. Prints top-1 and top-5 per head and prompt kind for each checkpoint side by side,
and the tokens per step a chain of the heads' top-1 guesses would keep (the one number that
compares independent heads with chained ones, whose head k > 0 is scored on the true path).
The held-out accuracies that training reports come from prompts like the training ones and
are higher.

With --trees, a second table gives the tokens per step that trees of each size would keep at
every answer position, drafted as the server drafts (server/drafter.py): the checkpoint's
fixed tree (the first n - 1 paths of its expansion order) against the n - 1 nodes each
draft itself finds likeliest (what the speculation policy verifies).
"""
from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

from benchmarks.eval_prompts import CHAT, CODE
from models.batch_generator import generate_batch
from models.fetch import ensure_default_model
from models.head_checkpoint import DEFAULT_HEADS_DIR, load_heads
from models.head_trainer import chain_length, evaluate, head_targets
from models.loader import load_model
from models.tokenizer import Tokenizer
from server.drafter import Drafter
from server.tree import best_nodes, kept_by_tree


@torch.inference_mode()
def answers(model, tokenizer, prompts: list[str], max_tokens: int):
    """-> hidden [N, H] fp32, tokens [N], offsets [S + 1] of the greedy answers."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    done = sorted(generate_batch(model, ids, [0.0] * len(ids), max_tokens, tokenizer.eos_token_ids,
                                 max_batch=len(ids)), key=lambda c: c.index)
    hidden = torch.cat([c.hidden_states() for c in done]).float()
    tokens = torch.tensor([t for c in done for t in c.output_ids])
    offsets = torch.tensor([0] + [len(c.output_ids) for c in done]).cumsum(0)
    return hidden, tokens, offsets


@torch.inference_mode()
def tree_lengths(checkpoint, model, hidden, tokens, offsets, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """Tree size -> mean tokens per step (1 + drafted tokens kept) of (the fixed tree, each
    draft's likeliest nodes), over every answer position with the heads' depth of text after it."""
    paths = checkpoint.tree_paths
    depth = checkpoint.heads.config.num_heads
    drafter = Drafter(checkpoint.heads, model, paths)
    rows = [t for s in range(len(offsets) - 1) for t in range(int(offsets[s]), int(offsets[s + 1]) - depth)]
    ids = tokens.tolist()
    totals = {n: [0, 0] for n in sizes}
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        drafts = drafter.draft(hidden[chunk], [ids[t] for t in chunk], [max(sizes)] * len(chunk))
        for t, draft in zip(chunk, drafts):
            future = ids[t + 1: t + 1 + depth]
            for n in sizes:
                fixed = kept_by_tree(paths[: n - 1], draft.tokens, future)
                nodes = best_nodes(draft.chances, min(n - 1, len(draft)))
                likeliest = kept_by_tree(tuple(paths[j] for j in nodes), [draft.tokens[j] for j in nodes], future)
                totals[n][0] += fixed
                totals[n][1] += likeliest
    return {n: (1 + a / len(rows), 1 + b / len(rows)) for n, (a, b) in totals.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=[str(DEFAULT_HEADS_DIR)])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--trees", default="", help="comma-separated tree sizes: also compare fixed trees with "
                                                     "each draft's likeliest nodes (e.g. 2,4,8,16)")
    args = parser.parse_args(argv)
    model_dir = ensure_default_model()
    model = load_model(model_dir, "float32", "cpu")
    tokenizer = Tokenizer(model_dir, model.config.eos_token_id)
    loaded = {path: load_heads(path, model.config) for path in args.heads}
    checkpoints = {path: checkpoint.heads.eval() for path, checkpoint in loaded.items()}
    sizes = [int(n) for n in args.trees.split(",")] if args.trees else []
    trees = []
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {args.max_tokens} new tokens per prompt")
    print("| heads | prompts | positions | top-1 per head | top-5 per head | top-1 chain |")
    print("|---|---|---|---|---|---|")
    for kind, prompts in (("chat", CHAT), ("code", CODE)):
        hidden, tokens, offsets = answers(model, tokenizer, prompts, args.max_tokens)
        next_embeds = model.model.embed_tokens(tokens)
        for path, heads in checkpoints.items():
            targets = head_targets(tokens, offsets, heads.config.num_heads)
            embeds = next_embeds if heads.config.token_input else None
            table = model.model.embed_tokens.weight
            acc = evaluate(heads, model.lm_head, hidden, targets, embeds, token_embeddings=table)
            chain = chain_length(heads, model.lm_head, hidden, targets, embeds, token_embeddings=table)
            top1 = " / ".join(f"{row[0]:.3f}" for row in acc)
            top5 = " / ".join(f"{sum(row[:5]):.3f}" for row in acc)
            print(f"| {path} | {kind} | {hidden.shape[0]} | {top1} | {top5} | {chain:.3f} |", flush=True)
            if sizes:
                trees.append((path, kind, tree_lengths(loaded[path], model, hidden, tokens, offsets, sizes)))
    if sizes:
        print("\n| heads | prompts | tree | tokens per step, fixed tree | each draft's likeliest nodes |")
        print("|---|---|---|---|---|")
        for path, kind, lengths in trees:
            for n, (fixed, likeliest) in lengths.items():
                print(f"| {path} | {kind} | {n} | {fixed:.3f} | {likeliest:.3f} |")


if __name__ == "__main__":
    main()
