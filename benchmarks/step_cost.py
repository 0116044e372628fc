"""What one forward costs as the tokens in it grow: the price of a bigger tree.

    python -m benchmarks.step_cost [--context 300] [--sizes 1,2,4,8,16,32,64] [--rounds 5]

One sequence with `--context` cached tokens verifies a chain of n new tokens (logits on
every row, as a tree step has; the server's CPU attention), through the model with its
linear layers in our panel layout (where the kernel runs), oneDNN-packed, and plain
nn.Linear, interleaved round by round so machine noise hits all; prints the best time of
each, each size's cost relative to one token, and each layout's speed-up over nn.Linear.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from models.attention import KVCache, build_metadata
from models.cpu_attention import CpuAttention
from models.fetch import ensure_default_model
from models.loader import load_model
from models.cpu_kernels import cpu_kernels


@torch.inference_mode()
def forward_seconds(model, kv_cache: KVCache, context: int, n: int) -> float:
    table = list(range(kv_cache.num_blocks))
    masks = [[(1 << (i + 1)) - 1 for i in range(n)]]  # a chain: each token sees those before it
    metadata = build_metadata([n], [context + n], [table], kv_cache.block_size, 0, masks)
    ids = torch.zeros(n, dtype=torch.long)
    positions = torch.arange(context, context + n)
    started = time.perf_counter()
    model(ids, positions, CpuAttention(metadata, kv_cache), torch.arange(n))
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = ensure_default_model()
    models = {"oneDNN": load_model(model_dir, "float32", panels=False),
              "nn.Linear": load_model(model_dir, "float32", pack=False)}
    if cpu_kernels() is not None:
        models = {"panels": load_model(model_dir, "float32"), **models}
    config = models["oneDNN"].config
    block_size = 16
    num_blocks = (args.context + max(sizes) + block_size - 1) // block_size
    caches = {}
    for name, model in models.items():
        caches[name] = KVCache(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                               config.head_dim, torch.float32)
        prefill = build_metadata([args.context], [args.context], [list(range(num_blocks))], block_size, 1)
        with torch.inference_mode():
            model(torch.zeros(args.context, dtype=torch.long), torch.arange(args.context),
                  CpuAttention(prefill, caches[name]))
    best = {(name, n): float("inf") for name in models for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            for name, model in models.items():
                best[name, n] = min(best[name, n], forward_seconds(model, caches[name], args.context, n))
    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, context {args.context}, "
          f"best of {args.rounds}")
    print("| tokens in the step | " + " | ".join(str(n) for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in models:
        ms = " | ".join(f"{best[name, n] * 1e3:.0f} ms ({best[name, n] / best[name, sizes[0]]:.2f}x)" for n in sizes)
        print(f"| {name} | {ms} |")
    for name in models:
        if name != "nn.Linear":
            ratio = " | ".join(f"{best['nn.Linear', n] / best[name, n]:.2f}x" for n in sizes)
            print(f"| {name} speed-up over nn.Linear | {ratio} |")


if __name__ == "__main__":
    main()
