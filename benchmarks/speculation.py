"""Speculation at batch 1: mean accepted length and tokens/s over tree sizes, in one run.

    python -m benchmarks.speculation [--max-tokens 128] [--sizes 1,4,8,16,32,64] [--top-p 1.0] [--heads DIR ...]
                                     [--lookup-tokens 8[,0]] [--datastore default[,none]]
                                     [--linear exact[,int8]] [--cuda-graphs on[,off]]
                                     [--cpu-decoder on[,off]]

Runs every evaluation prompt (chat and code, never training prompts) alone through one
engine, at temperature 0 and 0.7, for each fixed tree size (1 = plain decoding, the same
engine; the first size is the baseline) and the adaptive policy, prompt by prompt with every
variant in turn; prints a Markdown table. Several --heads, lookup lengths (0: no lookup
chain), datastores (default: the heads' own; none: off) or linear layers (exact fp32
products, or --int8-linear's) or launch modes on CUDA (steps replayed from CUDA graphs, or
launched eagerly) run side by side, one engine each, interleaved size by size, each against
its own plain rate.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from benchmarks.engines import make_engine
from benchmarks.eval_prompts import MIXED
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams


def run_one(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[int, float, int, int]:
    """-> (generated tokens, seconds, speculation steps, accepted drafted tokens)."""
    engine.add_request("bench", prompt_ids, params)
    seq = engine.sequences["bench"]
    tokens = 0
    started = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if started is None:  # time decoding only, from the first token on
                started = time.perf_counter()
            else:
                tokens += len(out.token_ids)
    return tokens, time.perf_counter() - started, seq.spec.steps, seq.spec.accepted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sizes", default="1,4,8,16,32,64")
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p of the sampled runs (1: off)")
    parser.add_argument("--prompts", type=int, default=len(MIXED))
    parser.add_argument("--heads", nargs="*", default=[None], help="head checkpoints (default: the shipped heads)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lookup-tokens", default=str(EngineConfig.lookup_tokens),
                        help="comma-separated longest lookup chains to compare (0: none)")
    parser.add_argument("--datastore", default="default",
                        help="comma-separated datastores to compare (default: the heads' own; none: off; or a file)")
    parser.add_argument("--linear", default="exact",
                        help="comma-separated linear layers to compare: exact (fp32 products) and/or int8 "
                             "(--int8-linear)")
    parser.add_argument("--cuda-graphs", default="on",
                        help="comma-separated CUDA launch modes to compare: on (graphs) and/or off (eager)")
    parser.add_argument("--cpu-decoder", default="on",
                        help="comma-separated CPU layer paths to compare: on (the C++ decoder, "
                             "models/cpu_decoder.py) and/or off (the Python layers)")
    args = parser.parse_args(argv)
    engines = {f"{heads or 'shipped'}, lookup {lookup}, datastore {store}, {linear}, graphs {graphs}, "
               f"decoder {decoder}": make_engine(
                   EngineConfig(heads=heads, dtype=args.dtype, max_num_seqs=1, kv_cache_memory_gb=0.25,
                                lookup_tokens=lookup, datastore=None if store == "default" else store,
                                int8_linear=linear == "int8", cuda_graphs=graphs == "on",
                                prefix_caching=False), decoder == "on")   # each size computes its prompts
               for heads in args.heads for lookup in [int(n) for n in args.lookup_tokens.split(",")]
               for store in args.datastore.split(",") for linear in args.linear.split(",")
               for graphs in args.cuda_graphs.split(",") for decoder in args.cpu_decoder.split(",")}
    tokenizer = next(iter(engines.values())).tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in MIXED[: args.prompts]]
    sizes: list[int | None] = [int(s) for s in args.sizes.split(",")] + [None]
    print(f"# {date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{len(prompts)} prompts x {args.max_tokens} new tokens"
          + (f", top-p {args.top_p} when sampling" if args.top_p < 1.0 else ""))
    print("| heads | temperature | tree | mean accepted length | tokens/s | speed-up vs plain |")
    print("|---|---|---|---|---|---|")
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        # prompt by prompt, every size and engine in turn: a slow spell of a shared machine
        # then hits every variant alike instead of the ones that ran during it
        totals = {(heads, size): [0, 0.0, 0, 0] for size in sizes for heads in engines}
        for ids in prompts:
            for size in sizes:
                for heads, engine in engines.items():
                    engine.set_tree_budget(size)
                    # no seed: seeded sampling pins the tree size, which would turn "adaptive" into a fixed tree
                    params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, ignore_eos=True,
                                            top_p=args.top_p if temperature > 0 else 1.0)
                    for i, value in enumerate(run_one(engine, ids, params)):
                        totals[heads, size][i] += value
        for size in sizes:
            for heads in engines:
                tokens, seconds, steps, accepted = totals[heads, size]
                rate, plain = tokens / seconds, totals[heads, sizes[0]][0] / totals[heads, sizes[0]][1]
                label = "adaptive" if size is None else str(size)
                print(f"| {heads} | {temperature} | {label} | {1 + accepted / max(steps, 1):.2f} | "
                      f"{rate:.1f} | {rate / plain:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
