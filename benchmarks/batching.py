"""Throughput and inter-token latency under concurrency: plain vs fixed tree vs adaptive.

    python -m benchmarks.batching [--concurrency 1,4,16,32] [--max-tokens 64] [--fixed-tree 16]
                                  [--rounds 1] [--temperature 0 [--top-p 1]] [--without-datastore] [--int8-linear]
                                  [--kv-cache-dtype auto[,float16]] [--cpu-decoder on[,off]]
                                  [--cuda-graphs on[,off]]

For each concurrency c, c requests (evaluation prompts, greedy unless --temperature, lengths
spread around --max-tokens) are in flight at once in one engine, each finished one replaced
by the next (a closed-loop client); a run serves
max(--requests-per-slot x c, --min-requests) requests and is timed while c of them are in
flight: once the queue runs dry the batch drains, and a draining batch (where requests that
speculation finished early are no longer replaced) says nothing about concurrency c. The
same engine runs (a) plain decoding (tree of 1), (b) a fixed tree and (c) the load-adaptive
policy, side by side in one run (with --without-datastore also (d) the adaptive policy
without datastore chains, server/datastore.py); with several --kv-cache-dtype, --cpu-decoder
or --cuda-graphs values, one engine each, every mode on every engine. With --rounds R each mode runs R times at
each concurrency, the modes interleaved and their order rotated every round (so that a slow
spell of a shared machine hits every mode alike), each round on the next prompts. Prints
generated tokens/s over all rounds and p50/p99 inter-token latency (a step that yields k
tokens for a request counts k gaps of step/k).
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, max_tokens: int,
        first: int = 0, requests: int | None = None, spread: float = 0.0,
        temperature: float = 0.0, top_p: float = 1.0) -> tuple[int, float, list[float]]:
    """`requests` (default: concurrency) requests from prompts[first:], `concurrency` of them
    in flight at a time (a finished one is replaced at once, as by a closed-loop client)
    -> (tokens, seconds, inter-token gaps) until fewer than `concurrency` are left in flight
    (the rest runs to free the engine, untimed). Request i asks for max_tokens times
    1 - spread .. 1 + spread (the same lengths in every mode, evenly spread)."""
    requests = requests or concurrency
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        scale = 1.0 + spread * (2.0 * ((first + submitted) * 0.618034 % 1.0) - 1.0)
        params = SamplingParams(max_tokens=max(1, round(max_tokens * scale)), temperature=temperature, top_p=top_p,
                                ignore_eos=True)
        engine.add_request(f"r{submitted}", prompts[(first + submitted) % len(prompts)], params)
        submitted += 1

    for _ in range(min(concurrency, requests)):
        submit()
    last: dict[str, float] = {}
    gaps: list[float] = []
    tokens = 0
    started = time.perf_counter()
    window = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if window is None:
                tokens += len(out.token_ids)
                if out.request_id in last and out.token_ids:
                    gaps += [(now - last[out.request_id]) / len(out.token_ids)] * len(out.token_ids)
            last[out.request_id] = now
            if out.finish_reason is not None and submitted < requests:
                submit()
        if window is None and len(engine.sequences) < concurrency:
            window = now - started
    return tokens, window, gaps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--fixed-tree", type=int, default=16)
    parser.add_argument("--heads", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode per concurrency, interleaved")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy requests")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--spread", type=float, default=0.5,
                        help="request lengths vary by this share of --max-tokens either way (0: all equal, "
                             "and a plain-decoding batch finishes and refills in lockstep, as real traffic never does)")
    parser.add_argument("--requests-per-slot", type=int, default=3,
                        help="requests per run, per request in flight")
    parser.add_argument("--min-requests", type=int, default=8,
                        help="requests per run at least: low concurrency gets enough tokens to measure")
    parser.add_argument("--without-datastore", action="store_true",
                        help="also run the adaptive policy without the datastore's chains")
    parser.add_argument("--int8-linear", action="store_true", help="the engine's --int8-linear")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="comma-separated KV-cache dtypes to compare (auto: the model's; float16), one engine each")
    parser.add_argument("--cpu-decoder", default="on",
                        help="comma-separated CPU layer paths to compare: on (the C++ decoder, "
                             "models/cpu_decoder.py) and/or off (the Python layers), one engine each")
    parser.add_argument("--cuda-graphs", default="on",
                        help="comma-separated CUDA launch modes to compare: on (graphs) and/or off (eager), "
                             "one engine each")
    args = parser.parse_args(argv)
    engines = {kv + ("" if decoder == "on" else ", decoder off") + ("" if graphs == "on" else ", graphs off"):
               make_engine(EngineConfig(heads=args.heads, max_num_seqs=64, max_num_batched_tokens=1024,
                                        kv_cache_memory_gb=2.0, int8_linear=args.int8_linear, kv_cache_dtype=kv,
                                        cuda_graphs=graphs == "on",
                                        prefix_caching=False),   # every mode computes its prompts
                           decoder == "on")
               for kv in args.kv_cache_dtype.split(",") for decoder in args.cpu_decoder.split(",")
               for graphs in args.cuda_graphs.split(",")}
    first = next(iter(engines.values()))
    prompts = [first.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in MIXED]
    modes = []   # (engine, mode, tree size, datastore)
    for kv, engine in engines.items():
        modes += [(kv, "plain", 1, engine.datastore), (kv, f"tree {args.fixed_tree}", args.fixed_tree, engine.datastore),
                  (kv, "adaptive", None, engine.datastore)]
        if args.without_datastore:
            modes.append((kv, "adaptive, no datastore", None, None))
    linear = ", int8 linear layers" if args.int8_linear else ""
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32{linear}, "
          f"{f'temperature {args.temperature}, top-p {args.top_p}' if args.temperature > 0 else 'greedy'}, {args.max_tokens} +- {args.spread:.0%} new tokens per request, "
          f"{args.rounds} round(s), "
          f"max({args.requests_per_slot} x c, {args.min_requests}) requests per run, timed while c are in flight")
    print("| concurrency | KV cache | mode | tokens/s | p50 ITL ms | p99 ITL ms | vs best fixed |")
    print("|---|---|---|---|---|---|---|")
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        totals = {(kv, label): [0, 0.0, []] for kv, label, _, _ in modes}
        for r in range(args.rounds):
            for kv, label, size, store in modes[r % len(modes):] + modes[:r % len(modes)]:
                engine = engines[kv]
                engine.datastore = store
                engine.set_tree_budget(size)
                requests = max(args.requests_per_slot * concurrency, args.min_requests)
                tokens, seconds, gaps = run(engine, prompts, concurrency, args.max_tokens, r * requests, requests,
                                            args.spread, args.temperature, args.top_p)
                totals[kv, label][0] += tokens
                totals[kv, label][1] += seconds
                totals[kv, label][2] += gaps
        rows = [(kv, label, n / t, percentile(g, 0.5) * 1e3, percentile(g, 0.99) * 1e3)
                for (kv, label), (n, t, g) in totals.items()]
        for kv, label, rate, p50, p99 in rows:
            best_fixed = max(r[2] for r in rows if r[0] == kv and (r[1] == "plain" or r[1].startswith("tree")))
            print(f"| {concurrency} | {kv} | {label} | {rate:.1f} | {p50:.0f} | {p99:.0f} | {rate / best_fixed:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
