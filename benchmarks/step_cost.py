"""What one forward costs as the tokens in it grow: the price of a bigger tree.

    python -m benchmarks.step_cost [--context 300] [--sizes 1,2,4,8,16,32,64] [--rounds 5]

One sequence with `--context` cached tokens verifies a chain of n new tokens (logits on
every row, as a tree step has), through the model in four set-ups, interleaved round by
round so machine noise hits all: Gorgon's CPU kernels for the linear layers (8-bit integer
products where the CPU has AVX-512 VNNI, exact 4/8-bit panels, fp32 panels) and
the decode/tree attention (where they run), the panels with PyTorch's SDPA, oneDNN-packed
weights with SDPA, and plain nn.Linear with SDPA. Prints the best time of each, each
size's cost relative to one token, and each set-up's speed-up over oneDNN with SDPA.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from models.attention import KVCache, TorchAttention, build_metadata
from models.cpu_attention import CpuAttention
from models.fetch import ensure_default_model
from models.loader import load_model
from models.cpu_kernels import cpu_kernels
from models.packed_linear import int8_supported


@torch.inference_mode()
def forward_seconds(model, attention_cls, kv_cache: KVCache, context: int, n: int) -> float:
    table = list(range(kv_cache.num_blocks))
    masks = [[(1 << (i + 1)) - 1 for i in range(n)]]  # a chain: each token sees those before it
    metadata = build_metadata([n], [context + n], [table], kv_cache.block_size, 0, masks)
    ids = torch.zeros(n, dtype=torch.long)
    positions = torch.arange(context, context + n)
    started = time.perf_counter()
    model(ids, positions, attention_cls(metadata, kv_cache), torch.arange(n))
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = ensure_default_model()
    variants = {}   # name -> (model, attention backend)
    if int8_supported():
        variants["4/8-bit x 8-bit integers, C++ attention"] = (load_model(model_dir, "float32", int8=True),
                                                                CpuAttention)
    if cpu_kernels() is not None:
        variants["4/8-bit panels, C++ attention"] = (load_model(model_dir, "float32"), CpuAttention)
        panels = load_model(model_dir, "float32", quantized=False)
        variants["panels, C++ attention"] = (panels, CpuAttention)
        variants["panels, SDPA"] = (panels, TorchAttention)
    variants["oneDNN, SDPA"] = (load_model(model_dir, "float32", panels=False), TorchAttention)
    variants["nn.Linear, SDPA"] = (load_model(model_dir, "float32", pack=False), TorchAttention)
    config = variants["oneDNN, SDPA"][0].config
    block_size = 16
    num_blocks = (args.context + max(sizes) + block_size - 1) // block_size
    caches = {}
    for name, (model, attention_cls) in variants.items():
        caches[name] = KVCache(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                               config.head_dim, torch.float32)
        prefill = build_metadata([args.context], [args.context], [list(range(num_blocks))], block_size, 1)
        with torch.inference_mode():
            model(torch.zeros(args.context, dtype=torch.long), torch.arange(args.context),
                  attention_cls(prefill, caches[name]))
    best = {(name, n): float("inf") for name in variants for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            for name, (model, attention_cls) in variants.items():
                best[name, n] = min(best[name, n], forward_seconds(model, attention_cls, caches[name],
                                                                   args.context, n))
    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, context {args.context}, "
          f"best of {args.rounds}")
    print("| linear layers, attention | " + " | ".join(f"{n} tokens" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in variants:
        ms = " | ".join(f"{best[name, n] * 1e3:.0f} ms ({best[name, n] / best[name, sizes[0]]:.2f}x)" for n in sizes)
        print(f"| {name} | {ms} |")
    for name in variants:
        if name != "oneDNN, SDPA":
            ratio = " | ".join(f"{best['oneDNN, SDPA', n] / best[name, n]:.2f}x" for n in sizes)
            print(f"| {name}: speed-up over oneDNN, SDPA | {ratio} |")


if __name__ == "__main__":
    main()
