"""`python -m models.train_heads`: train Medusa heads for a frozen base model (Medusa-1).

Steps (each resumable; `all` runs them in order):
  data    the base model answers the project's own prompts (greedy, batched) and the final
          hidden states that produced each answer token are cached (fp16) in the work dir;
  train   heads learn from the cache (0.8^k-weighted cross-entropy, reduced vocabulary);
  eval    per-head top-1 / top-5 accuracy on the held-out prompts, guessing as the server does;
  export  eval + tree tuning, written in Gorgon's head format (models/head_checkpoint.py),
          with the datastore of the training answers (server/datastore.py) beside the heads.

The shipped heads for the default model are `python -m models.train_heads all --out
models/heads_data/smollm2-135m-instruct` (recipe in docs/heads.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from models.distill_data import MIXES, DataRecipe, datastore_answers, generate_shards, load_shards
from models.fetch import ensure_default_model, gorgon_home
from models.head_checkpoint import DATASTORE_FILE, TREE_BUDGETS, load_heads, model_checksum, save_heads
from models.head_trainer import HeadTrainer, TrainConfig, chain_length, evaluate, head_targets, reduced_vocabulary
from server.datastore import Datastore

COMMANDS = ("all", "data", "train", "eval", "export")


def parse_data_spec(spec: str) -> list[tuple[str, int]]:
    """'general:2400,varied:1920' -> [('general', 2400), ('varied', 1920)]"""
    out = []
    for part in spec.split(","):
        mix, _, count = part.strip().partition(":")
        if mix not in MIXES or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"bad data entry {part!r}: want MIX:COUNT with MIX in {', '.join(MIXES)}")
        out.append((mix, int(count)))
    if len({mix for mix, _ in out}) != len(out):
        raise argparse.ArgumentTypeError("each mix once")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train_heads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="all", choices=COMMANDS)
    p.add_argument("--model", help="base model directory (default: the default model)")
    p.add_argument("--work-dir", help="cache for data and runs (default: $GORGON_HOME/train/<model>)")
    p.add_argument("--run-dir", help="training checkpoints (default: <work-dir>/run-seed<seed>)")
    p.add_argument("--out", help="export directory (default: <work-dir>/heads)")
    p.add_argument("--heads", help="eval: a head checkpoint to evaluate instead of the run's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    d, t = DataRecipe(), TrainConfig()
    p.add_argument("--data", default=f"{d.mix}:{d.num_prompts}", type=parse_data_spec,
                   help="prompt mixes and counts, e.g. general:2400,varied:1920 (mixes: "
                        f"{', '.join(MIXES)}); each has its own data directory in the work dir")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-batch", type=int, default=48, help="sequences per forward while generating")
    p.add_argument("--num-heads", type=int, default=t.num_heads)
    p.add_argument("--num-layers", type=int, default=t.num_layers)
    p.add_argument("--own-unembedding", action="store_true", help="one unembedding per head (large)")
    p.add_argument("--no-token-input", action="store_true",
                   help="plain Medusa heads: do not read the next token's embedding (needed for Medusa's format)")
    p.add_argument("--chained", action="store_true",
                   help="chained heads: head k reads head k - 1's output and the path's token at depth k")
    p.add_argument("--detach-chain", action="store_true",
                   help="chained heads: each head's loss trains that head only (head 1 stays as good alone)")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--coverage", type=float, default=t.coverage)
    p.add_argument("--max-vocab", type=int, default=t.max_vocab)
    p.add_argument("--hidden-loss-weight", type=float, default=t.hidden_loss_weight,
                   help="weight of the distillation to the base model's hidden states (0: off)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (resume later)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-positions", type=int, default=4000, help="held-out positions to score")
    return p.parse_args(argv)


class Session:
    """Paths, the base model and the cached data of one invocation."""

    def __init__(self, args: argparse.Namespace):
        from models.loader import load_model

        self.args = args
        self.model_dir = Path(args.model) if args.model else ensure_default_model()
        self.work_dir = Path(args.work_dir) if args.work_dir else gorgon_home() / "train" / self.model_dir.name
        self.run_dir = Path(args.run_dir) if args.run_dir else self.work_dir / f"run-seed{args.seed}"
        self.device = torch.device(args.device)
        self.model = load_model(self.model_dir, "float32", self.device)
        self.recipes = [DataRecipe(num_prompts=count, max_new_tokens=args.max_new_tokens, seed=args.seed, mix=mix)
                        for mix, count in args.data]
        self.train_config = TrainConfig(
            num_heads=args.num_heads, num_layers=args.num_layers, shared_unembedding=not args.own_unembedding,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, coverage=args.coverage,
            max_vocab=args.max_vocab, hidden_loss_weight=args.hidden_loss_weight,
            token_input=not args.no_token_input, chained=args.chained,
            detach_chain=args.detach_chain, seed=args.seed)

    def split(self, held_out: bool):
        """-> hidden [N, H], targets [N, heads], next tokens [N] (the base model's pick from
        each row), over every mix in --data."""
        hidden, targets, tokens = [], [], []
        for recipe in self.recipes:
            num_shards = -(-recipe.num_prompts // recipe.chunk_size)
            h, t, offsets = load_shards(recipe.data_dir(self.work_dir), held_out, num_shards)
            hidden.append(h)
            targets.append(head_targets(t, offsets, self.args.num_heads))
            tokens.append(t)
        return torch.cat(hidden), torch.cat(targets), torch.cat(tokens)

    def record(self, **values) -> dict:
        path = self.run_dir / "record.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        record.update(values)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        return record


def run_data(s: Session) -> None:
    from models.tokenizer import Tokenizer

    start = time.time()
    tokenizer = Tokenizer(s.model_dir, s.model.config.eos_token_id)
    for recipe in s.recipes:
        generate_shards(s.model, tokenizer, recipe, recipe.data_dir(s.work_dir), s.args.max_batch)
        print(f"data: {recipe.data_dir(s.work_dir) / 'shards'} ({time.time() - start:.0f} s this run)")


def make_trainer(s: Session, hidden: torch.Tensor, targets: torch.Tensor) -> HeadTrainer:
    vocab_ids = reduced_vocabulary(targets, s.model.config.vocab_size, s.train_config.coverage,
                                   s.train_config.max_vocab)
    covered = torch.isin(targets[targets >= 0], vocab_ids).float().mean()
    print(f"train: {hidden.shape[0]} positions, reduced vocabulary {len(vocab_ids)} tokens "
          f"covering {float(covered):.3f} of the targets")
    trainer = HeadTrainer(s.train_config, s.model.lm_head.weight.detach(), vocab_ids, hidden.shape[0], s.device,
                          s.model.model.embed_tokens.weight.detach())
    checkpoint = s.run_dir / "checkpoint.pt"
    if checkpoint.exists():
        trainer.load_state_dict(torch.load(checkpoint, map_location=s.device, weights_only=True))
        print(f"train: resumed {checkpoint} at step {trainer.step}/{trainer.total_steps}")
    return trainer


def save_checkpoint(s: Session, trainer: HeadTrainer) -> None:
    s.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = s.run_dir / "checkpoint.pt.tmp"
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, s.run_dir / "checkpoint.pt")


def run_train(s: Session) -> HeadTrainer:
    hidden, targets, next_tokens = s.split(held_out=False)
    trainer = make_trainer(s, hidden, targets)
    start, first_step = time.time(), trainer.step
    trainer.train(hidden, targets, next_tokens, save=lambda t: save_checkpoint(s, t), save_every=s.args.save_every,
                  max_steps=s.args.max_steps)
    if trainer.step > first_step:
        seconds = time.time() - start
        record = json.loads((s.run_dir / "record.json").read_text()) if (s.run_dir / "record.json").exists() else {}
        s.record(train_seconds=round(record.get("train_seconds", 0) + seconds, 1),
                 train_positions=int(hidden.shape[0]), reduced_vocab=int(len(trainer.vocab_ids)))
    return trainer


def print_accuracies(accuracies: list[list[float]], positions: int, draft_vocab: int | None) -> None:
    vocab = f"draft vocabulary of {draft_vocab} tokens" if draft_vocab else "full vocabulary"
    print(f"held-out accuracy ({positions} positions, {vocab})")
    print("head  top-1  top-5")
    for k, row in enumerate(accuracies):
        print(f"{k + 1:>4}  {row[0]:.3f}  {sum(row[:5]):.3f}")


def run_eval(s: Session, heads=None) -> list[list[float]]:
    if heads is None and s.args.heads:
        heads = load_heads(s.args.heads, s.model.config, device=s.device).heads
    if heads is None:
        hidden, targets, _ = s.split(held_out=False)
        heads = make_trainer(s, hidden, targets).heads  # the full targets: they fix the vocabulary
        del hidden, targets
    hidden, targets, next_tokens = s.split(held_out=True)
    n = s.args.eval_positions
    hidden, targets, next_tokens = hidden[:n], targets[:n], next_tokens[:n].long().to(s.device)
    next_embeds = s.model.model.embed_tokens(next_tokens) if heads.config.token_input else None
    accuracies = evaluate(heads.eval(), s.model.lm_head, hidden, targets, next_embeds,
                          token_embeddings=s.model.model.embed_tokens.weight)
    print_accuracies(accuracies, hidden.shape[0], None if heads.draft_vocab is None else len(heads.draft_vocab))
    chain = chain_length(heads, s.model.lm_head, hidden, targets, next_embeds,
                         token_embeddings=s.model.model.embed_tokens.weight)
    print(f"a chain of each head's top-1 keeps {chain:.3f} tokens per step")
    return accuracies


def run_export(s: Session, heads=None) -> None:
    if heads is None:
        hidden, targets, _ = s.split(held_out=False)
        heads = make_trainer(s, hidden, targets).heads
    accuracies = run_eval(s, heads)
    out = Path(s.args.out) if s.args.out else s.work_dir / "heads"
    record = s.record(held_out_top1=[round(a[0], 4) for a in accuracies],
                      held_out_top5=[round(sum(a[:5]), 4) for a in accuracies])
    extra = {"training": {"command": "python -m models.train_heads all", "data": [asdict(r) for r in s.recipes],
                          "train": asdict(s.train_config), **record}}
    meta = save_heads(out, heads, accuracies, s.model_dir.name, model_checksum(s.model_dir), extra)
    answers = [a for r in s.recipes
               for a in datastore_answers(r.data_dir(s.work_dir), -(-r.num_prompts // r.chunk_size))]
    datastore = Datastore.from_answers(answers)
    datastore.save(out / DATASTORE_FILE)
    print(f"datastore: {len(answers)} answers, {datastore.num_tokens} tokens")
    lengths = meta["tree"]["expected_accept_length"]
    print("expected accepted length per tree budget: "
          + ", ".join(f"{b}: {lengths[str(b)]:.2f}" for b in TREE_BUDGETS))
    print(f"export: {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    s = Session(args)
    if args.command in ("all", "data"):
        run_data(s)
    if args.command in ("all", "train"):
        trainer = run_train(s)
        if args.command == "all":
            run_export(s, trainer.heads)
        else:
            run_eval(s, trainer.heads)
    if args.command == "eval":
        run_eval(s)
    if args.command == "export":
        run_export(s)


if __name__ == "__main__":
    main()
