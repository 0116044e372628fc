"""Speculation under penalties and grammars: does it still pay, and what do they cost a step?

    python -m benchmarks.constrained [--prompts 8] [--max-tokens 128] [--variants none,penalties,json]
                                     [--concurrency 1] [--int8-linear]

One engine (the server's defaults: adaptive speculation; the prefix cache off, so every
variant computes its prompts), greedy, --concurrency requests at a time (a group of that
many prompts submitted together). Per variant, the same requests with speculation on and off
(`speculate: false`, one token a step), alternated group by group:

- none: the evaluation prompts, EOS ignored;
- penalties: the same with frequency 0.5, presence 0.5 and repetition 1.1;
- json: requests for a JSON record (a bounded schema of strings, numbers and a list),
  ending when the object is complete.

Columns: generated tokens per second, tokens per step, milliseconds per step, and of them
the time spent changing and masking logits (ModelRunner._process_logits).
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from benchmarks.eval_prompts import MIXED
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from server.structured import grammar_from

SUBJECTS = ["a lighthouse keeper", "a small bakery", "a mountain village", "a chess club", "a river ferry",
            "a public library", "a robot vacuum", "a vegetable garden", "a night train", "a jazz trio"]
TEXT = {"type": "string", "maxLength": 60}
RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "summary", "year", "tags", "rating"],
          "properties": {"name": TEXT, "summary": {"type": "string", "maxLength": 200},
                         "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
                         "tags": {"type": "array", "items": TEXT, "maxItems": 5},
                         "rating": {"type": "number", "minimum": 0, "maximum": 5}}}
PENALTIES = dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1)


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[int, int, float, float]:
    """(tokens, steps, seconds, seconds changing logits) for the prompts submitted together."""
    runner, spent = engine.runner, [0.0]
    process = runner._process_logits

    def timed(*args):
        started = time.perf_counter()
        process(*args)
        spent[0] += time.perf_counter() - started

    runner._process_logits = timed
    try:
        for i, ids in enumerate(prompts):
            engine.add_request(f"r{i}", ids, params)
        tokens = steps = 0
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            steps += 1
            tokens += sum(len(out.token_ids) for out in engine.step())
        return tokens, steps, time.perf_counter() - started, spent[0]
    finally:
        runner._process_logits = process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--variants", default="none,penalties,json")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--int8-linear", action="store_true")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(int8_linear=args.int8_linear, prefix_caching=False))
    grammar = grammar_from("json_schema", RECORD)
    chat = [engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in MIXED[:args.prompts]]
    records = [engine.tokenizer.apply_chat_template([{"role": "user", "content": f"Describe {subject} as a JSON record."}])
               for subject in (SUBJECTS * 4)[:args.prompts]]
    variants = {"none": (chat, {"ignore_eos": True}), "penalties": (chat, {"ignore_eos": True, **PENALTIES}),
                "json": (records, {"grammar": grammar})}
    variants = {name: variants[name] for name in args.variants.split(",")}
    totals = {(name, spec): [0, 0, 0.0, 0.0] for name in variants for spec in (True, False)}
    run(engine, chat[:1], SamplingParams(max_tokens=8, temperature=0.0))   # warm-up
    for g, first in enumerate(range(0, args.prompts, args.concurrency)):
        for name, (prompts, extra) in variants.items():
            for spec in ((True, False) if g % 2 == 0 else (False, True)):
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, speculate=spec, **extra)
                result = run(engine, prompts[first:first + args.concurrency], params)
                totals[name, spec] = [a + b for a, b in zip(totals[name, spec], result)]
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'int8' if args.int8_linear else 'exact'} linear layers, {args.prompts} prompts x up to {args.max_tokens} "
          f"tokens, greedy, {args.concurrency} at a time")
    print("| requests | speculation | tokens/s | tokens a step | ms a step | logits changes ms a step | spec / plain |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        plain = totals[name, False][0] / totals[name, False][2]
        for spec in (False, True):
            tokens, steps, seconds, spent = totals[name, spec]
            print(f"| {name} | {'adaptive' if spec else 'off'} | {tokens / seconds:.1f} | {tokens / steps:.2f} | "
                  f"{1000 * seconds / steps:.2f} | {1000 * spent / steps:.3f} | {tokens / seconds / plain:.2f}x |")


if __name__ == "__main__":
    main()
