"""What the prefix cache saves: time to first token with and without it, side by side.

    python -m benchmarks.prefix_cache [--turns 6] [--max-tokens 96] [--requests 16] [--concurrency 4]
                                      [--system-repeats 8] [--int8-linear]

Two engines built alike but for --prefix-caching run the same requests, alternately:

- a conversation: one chat of --turns turns. Each turn's prompt is the whole conversation so
  far, rendered by the chat template with the earlier answers as text (what a chat client
  sends), then the next user message (the evaluation prompts in order). The answers come from
  the caching engine and both engines get the same prompts. Per turn: the prompt's length,
  the tokens found cached, and the time to first token (TTFT) of each engine.
- a shared system prompt: --requests requests with the same long system prompt
  (--system-repeats copies of a paragraph) and different user messages, --concurrency in
  flight at a time: TTFT's median and 90th percentile, and the time for all of them.

TTFT counts from adding a request to the step that yields its first token, queueing
included. Greedy, --max-tokens new tokens at most per request.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from benchmarks.batching import percentile
from benchmarks.eval_prompts import MIXED
from server import metrics
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams

SYSTEM_PARAGRAPH = ("You are the assistant of a small software company. Answer questions about programming, "
                    "writing and everyday planning. Keep answers short and concrete, give code in fenced blocks, "
                    "and say so plainly when you do not know something. ")


def serve(engine: LLMEngine, prompts: list[list[int]], concurrency: int,
          max_tokens: int) -> tuple[list[float], list[list[int]], float, int]:
    """The prompts, `concurrency` in flight at a time -> (TTFT of each, output ids of each,
    seconds for all, tokens found in the prefix cache)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    added, first_token, outputs = {}, {}, {str(i): [] for i in range(len(prompts))}
    hits = metrics.prefix_cache_hits._value.get()
    started = time.perf_counter()
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.sequences) < concurrency:
            i = pending.pop(0)
            added[str(i)] = time.perf_counter()
            engine.add_request(str(i), prompts[i], params)
        for out in engine.step():
            if out.token_ids and out.request_id not in first_token:
                first_token[out.request_id] = time.perf_counter()
            outputs[out.request_id] += out.token_ids
    elapsed = time.perf_counter() - started
    ttft = [first_token[str(i)] - added[str(i)] for i in range(len(prompts))]
    return ttft, [outputs[str(i)] for i in range(len(prompts))], elapsed, int(
        metrics.prefix_cache_hits._value.get() - hits)


def conversation(engines: dict[str, LLMEngine], turns: int, max_tokens: int) -> None:
    tokenizer = engines["on"].tokenizer
    messages = []
    print("| turn | prompt tokens | cached | TTFT on (ms) | TTFT off (ms) | off / on |")
    print("|---|---|---|---|---|---|")
    totals = {"on": 0.0, "off": 0.0}
    for turn in range(turns):
        messages.append({"role": "user", "content": MIXED[turn % len(MIXED)]})
        prompt = tokenizer.apply_chat_template(messages)
        ttft = {}
        for label in ("on", "off") if turn % 2 == 0 else ("off", "on"):
            times, outputs, _, hits = serve(engines[label], [prompt], 1, max_tokens)
            ttft[label] = times[0]
            if label == "on":
                answer, cached = outputs[0], hits
        totals["on"] += ttft["on"]
        totals["off"] += ttft["off"]
        print(f"| {turn + 1} | {len(prompt)} | {cached} | {ttft['on'] * 1e3:.1f} | {ttft['off'] * 1e3:.1f} "
              f"| {ttft['off'] / ttft['on']:.2f}x |")
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
    print(f"| all | | | {totals['on'] * 1e3:.1f} | {totals['off'] * 1e3:.1f} | {totals['off'] / totals['on']:.2f}x |")


def shared_system_prompt(engines: dict[str, LLMEngine], requests: int, concurrency: int, repeats: int,
                         max_tokens: int) -> None:
    tokenizer = engines["on"].tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PARAGRAPH * repeats},
                                              {"role": "user", "content": MIXED[i % len(MIXED)]}])
               for i in range(requests)]
    print(f"\n{requests} requests, {concurrency} at a time, prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens sharing a {len(tokenizer.apply_chat_template([{'role': 'system', 'content': SYSTEM_PARAGRAPH * repeats}]))}-token system turn\n")
    print("| prefix cache | TTFT p50 (ms) | TTFT p90 (ms) | all requests (s) | cached tokens |")
    print("|---|---|---|---|---|")
    for label in ("off", "on"):
        times, _, elapsed, hits = serve(engines[label], prompts, concurrency, max_tokens)
        print(f"| {label} | {percentile(times, 0.5) * 1e3:.1f} | {percentile(times, 0.9) * 1e3:.1f} | {elapsed:.2f} "
              f"| {hits} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--system-repeats", type=int, default=8)
    parser.add_argument("--int8-linear", action="store_true")
    args = parser.parse_args(argv)
    engines = {label: LLMEngine(EngineConfig(max_num_seqs=max(4, args.concurrency), int8_linear=args.int8_linear,
                                             kv_cache_memory_gb=0.5, prefix_caching=label == "on"))
               for label in ("on", "off")}
    print(f"# benchmarks.prefix_cache, {date.today()}, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'int8' if args.int8_linear else 'fp32'} linear layers\n")
    conversation(engines, args.turns, args.max_tokens)
    shared_system_prompt(engines, args.requests, args.concurrency, args.system_repeats, args.max_tokens)


if __name__ == "__main__":
    main()
