"""Batch-1 greedy decoding: our model code vs transformers' generate, and the load time.

    python -m benchmarks.generation [--max-tokens 64] [--dtype float32] [--rounds 3]

Same model (the default one), same dtype, same prompts, alternating rounds in one run so
that machine noise hits both sides alike; prints tokens/s of each and the ratio, and the
default model's load time from the cache.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from benchmarks.eval_prompts import ALL
from models.fetch import default_gguf_path, ensure_default_model
from models.loader import load_model, parse_dtype
from models.tokenizer import Tokenizer
from server.generate import generate
from server.sampling_params import SamplingParams


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model_dir = ensure_default_model()
    load_times = []
    for _ in range(3):
        started = time.perf_counter()
        ours = load_model(model_dir, args.dtype)
        Tokenizer(model_dir, ours.config.eos_token_id)
        load_times.append(time.perf_counter() - started)
    tokenizer = Tokenizer(model_dir, ours.config.eos_token_id)
    gguf = default_gguf_path()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=parse_dtype(args.dtype)).eval()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in ALL[: args.prompts]]
    totals = {"gorgon": [0, 0.0], "transformers": [0, 0.0]}
    for _ in range(args.rounds):
        for ids in prompts:
            started = time.perf_counter()
            out = generate(ours, ids, params)
            totals["gorgon"][0] += len(out)
            totals["gorgon"][1] += time.perf_counter() - started
            with torch.inference_mode():
                started = time.perf_counter()
                ref = theirs.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens,
                                      min_new_tokens=args.max_tokens, do_sample=False)
                totals["transformers"][1] += time.perf_counter() - started
            totals["transformers"][0] += ref.shape[1] - len(ids)
    rates = {k: n / t for k, (n, t) in totals.items()}
    print(f"# {date.today()} {platform.node()} {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, {len(prompts)} prompts x {args.max_tokens} tokens "
          f"x {args.rounds} rounds")
    print("| | tokens/s (batch 1, greedy) |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"| ratio gorgon / transformers | {rates['gorgon'] / rates['transformers']:.2f}x |")
    print(f"\ndefault model load from cache (weights + tokenizer): best {min(load_times):.2f} s, "
          f"runs {', '.join(f'{t:.2f}' for t in load_times)} s")


if __name__ == "__main__":
    main()
