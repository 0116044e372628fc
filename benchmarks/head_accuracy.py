"""How well heads guess on the evaluation prompts (not their training distribution).

    python -m benchmarks.head_accuracy [--heads DIR ...] [--max-tokens 128]

The base model answers the chat and code evaluation prompts greedily; each head checkpoint
then guesses, from every answer position, the tokens 2..K+1 ahead, exactly as the server
drafts. Prints top-1 and top-5 per head and prompt kind for each checkpoint side by side,
and the tokens per step a chain of the heads' top-1 guesses would keep (the one number that
compares independent heads with chained ones, whose head k > 0 is scored on the true path).
The held-out accuracies that training reports come from prompts like the training ones and
are higher.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=[str(DEFAULT_HEADS_DIR)])
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    model_dir = ensure_default_model()
    model = load_model(model_dir, "float32", "cpu")
    tokenizer = Tokenizer(model_dir, model.config.eos_token_id)
    checkpoints = {path: load_heads(path, model.config).heads.eval() for path in args.heads}
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


if __name__ == "__main__":
    main()
