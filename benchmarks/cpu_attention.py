"""The CPU decode/tree attention kernel over an fp32 and an fp16 KV cache, side by side.

    python -m benchmarks.cpu_attention [--cases 1x1x300,1x4x300,32x1x300,16x1x600,32x4x300] [--rounds 3]

A case is BATCHxTREExCONTEXT: BATCH sequences, each verifying a chain of TREE new tokens
after CONTEXT cached ones, with the default model's heads (9 query, 3 KV heads of 64) in 30
layers (one cache per layer, as a step reads them), the sequences' blocks laid out one after
another. Each case and cache dtype runs in every round, interleaved; the table gives the best
time of a step's 30 calls of `tree_attention` and the fp16 cache's speed-up. At batch 16-32
the fp32 cache (hundreds of MB) streams from memory, where fp16 halves the bytes; a batch-1
step stays in the CPU's caches.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from models.attention import build_metadata
from models.cpu_kernels import cpu_kernels

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16


def step_ms(kernels, batch: int, tree: int, context: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best time (ms) of one step's attention: LAYERS calls over LAYERS caches."""
    per_seq = -(-(context + tree) // BLOCK)
    shape = (batch * per_seq, BLOCK, KV_HEADS, HEAD_DIM)
    k_caches = [torch.randn(shape).to(dtype) for _ in range(LAYERS)]
    v_caches = [torch.randn(shape).to(dtype) for _ in range(LAYERS)]
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
    chain = [(1 << (i + 1)) - 1 for i in range(tree)]
    md = build_metadata([tree] * batch, [context + tree] * batch, tables, BLOCK, 0, [chain] * batch)
    q = torch.randn(batch * tree, HEADS, HEAD_DIM)
    out = torch.empty_like(q)

    def step() -> float:
        started = time.perf_counter()
        for k, v in zip(k_caches, v_caches):
            kernels.tree_attention(out, q, k, v, md.block_tables, md.seq_lens, md.cu_seqlens_q, md.tree_mask, 0, 0,
                                   HEAD_DIM ** -0.5)
        return time.perf_counter() - started

    step()  # warm-up
    return min(step() for _ in range(repeats)) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1x1x300,1x4x300,32x1x300,16x1x600,32x4x300")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("Gorgon's CPU kernels are not available here")
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    dtypes = (torch.float32, torch.float16)
    best = {}
    for _ in range(args.rounds):
        for case in cases:
            for dtype in dtypes:
                best[case, dtype] = min(best.get((case, dtype), float("inf")), step_ms(kernels, *case, dtype))
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{LAYERS} layers of {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, best of {args.rounds} rounds")
    print("| batch | tree | context | fp32 cache ms | fp16 cache ms | fp16 speed-up |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        fp32, fp16 = best[case, torch.float32], best[case, torch.float16]
        print(f"| {case[0]} | {case[1]} | {case[2]} | {fp32:.2f} | {fp16:.2f} | {fp32 / fp16:.2f}x |")


if __name__ == "__main__":
    main()
