"""Greedy outputs of the engine in several set-ups, each against the first, in one process.

    python -m benchmarks.parity --variants cpu/torch/plain,cuda/triton/adaptive,cuda/torch/plain
                                [--dtype float32] [--prompts 16] [--max-tokens 96] [--save texts.json]
                                [--model DIR]

A variant is device/attention backend/speculation[/eager][/kv16], speculation one of plain,
adaptive or a fixed tree size in nodes; on CUDA with triton, steps replay from CUDA graphs (the
server's default) unless /eager launches every kernel from Python; /kv16 stores the KV cache in
fp16; /int8 (CPU) runs --int8-linear's integer products (the server's default on CPUs with
AVX-512 VNNI: `cpu/auto/plain/int8` gives the texts such a server must return).
Every evaluation prompt runs at once (one batch of different lengths) at temperature 0, after
a short warm-up run of them all (kernel compiles and graph captures). For each variant the
table gives how many outputs equal the first variant's token for token and, where one
differs, the first differing position and the first variant's margin there (top-1 minus
top-2 logit): a tiny margin is a near-tie that float rounding may flip between devices; a
large one is a bug. --save writes the first variant's texts (JSON,
prompt -> text) for `benchmarks.server_check`.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.eval_prompts import MIXED
from models.attention import KVCache, TorchAttention, build_metadata
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams


def parse_variant(spec: str, dtype: str, model: str | None) -> EngineConfig:
    device, backend, tree, *options = spec.split("/")
    if not set(options) <= {"eager", "kv16", "int8"}:
        raise SystemExit(f"unknown variant options {options} in {spec!r}: eager, kv16, int8")
    return EngineConfig(model=model, device=device, attention_backend=backend, speculation=tree != "plain",
                        tree_budget=None if tree in ("plain", "adaptive") else int(tree), dtype=dtype,
                        kv_cache_memory_gb=0.5, cuda_graphs="eager" not in options,
                        kv_cache_dtype="float16" if "kv16" in options else "auto", int8_linear="int8" in options)


def run_batch(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[str], float]:
    """-> (token ids, texts, decode tokens/s) of all prompts run together at temperature 0."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[int(out.request_id)] += out.token_ids
            texts[int(out.request_id)] += out.text
    seconds = time.perf_counter() - started
    return tokens, texts, sum(map(len, tokens)) / seconds


@torch.inference_mode()
def margin_at(engine: LLMEngine, ids: list[int]) -> float:
    """Top-1 minus top-2 logit of the next token after `ids`, by one plain prefill."""
    model, block = engine.model, 16
    config, device = model.config, engine.device
    num_blocks = -(-len(ids) // block)
    cache = KVCache(config.num_hidden_layers, num_blocks, block, config.num_key_value_heads, config.head_dim,
                    model.lm_head.weight.dtype, device)
    metadata = build_metadata([len(ids)], [len(ids)], [list(range(num_blocks))], block, 1, device=device)
    logits, _ = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
                      TorchAttention(metadata, cache), logits_rows=torch.tensor([len(ids) - 1], device=device))
    top = logits[0].float().topk(2).values
    return float(top[0] - top[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="cpu/torch/plain,cpu/torch/adaptive")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", help="model directory (default: the default model)")
    parser.add_argument("--prompts", type=int, default=len(MIXED))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--save", help="write the first variant's texts here (JSON)")
    args = parser.parse_args(argv)
    rows = []
    reference = None
    for spec in args.variants.split(","):
        engine = LLMEngine(parse_variant(spec, args.dtype, args.model))
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}])
                   for p in MIXED[: args.prompts]]
        run_batch(engine, prompts, 8)  # warm-up: kernel compiles and graph captures out of the rate
        tokens, texts, rate = run_batch(engine, prompts, args.max_tokens)
        if reference is None:
            reference = (engine, tokens)
            if args.save:
                with open(args.save, "w") as f:
                    json.dump(dict(zip(MIXED, texts)), f, indent=1)
        same, firsts = 0, []
        for i, (ours, theirs) in enumerate(zip(tokens, reference[1])):
            if ours == theirs:
                same += 1
                continue
            at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            firsts.append(f"#{i}@{at} margin {margin_at(reference[0], prompts[i] + theirs[:at]):.3f}")
        rows.append((spec, same, len(prompts), rate, "; ".join(firsts)))
        print(f"{spec}: {same}/{len(prompts)} identical, {rate:.1f} tokens/s", flush=True)
        if engine is not reference[0]:
            del engine
    print(f"\n{args.dtype}, {rows[0][2]} prompts x up to {args.max_tokens} tokens, "
          f"temperature 0, all at once; first variant = reference")
    print("| variant | identical to the reference | decode tokens/s | first differences (prompt@token, margin) |")
    print("|---|---|---|---|")
    for spec, same, total, rate, firsts in rows:
        print(f"| {spec} | {same}/{total} | {rate:.1f} | {firsts or '-'} |")


if __name__ == "__main__":
    main()
