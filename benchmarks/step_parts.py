"""Where a decoding step's time goes, part by part, for plain decoding and fixed and adaptive trees.

    python -m benchmarks.step_parts [--concurrency 1] [--prompts 4] [--max-tokens 64]
                                    [--sizes 1,4,16] [--int8-linear] [--no-cuda-graphs]

The engine as the server builds it (CUDA graphs on CUDA) runs the evaluation prompts,
`--concurrency` at a time; each engine part is timed from outside: scheduling (with the
speculation policy's planning), the forward (with the logits), greedy tokens (their copy
to the host), the heads' drafts, the cache commit of accepted rows; "other" is the rest of
a step (acceptance, output processing, bookkeeping). On CUDA every timed part synchronises
the device before and after, so its GPU work counts where it is launched (a step reads its
tokens back to the host anyway). Prints milliseconds per step of each part.
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from datetime import date

import torch

import server.model_runner as model_runner
from benchmarks.eval_prompts import MIXED
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams

PARTS = ("schedule", "forward", "greedy", "draft", "commit")


class PartTimer:
    """Wraps callables so that each call's wall time adds to its part."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[part] += time.perf_counter() - started
        return timed


def instrument(engine: LLMEngine) -> PartTimer:
    timer = PartTimer(engine.device)
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)
    engine.runner.forward = timer.wrap("forward", engine.runner.forward)
    engine.kv_cache.move_slots = timer.wrap("commit", engine.kv_cache.move_slots)
    if engine.runner.drafter is not None:
        engine.runner.drafter.draft = timer.wrap("draft", engine.runner.drafter.draft)
    engine.step = timer.wrap("step", engine.step)
    return timer


def run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> tuple[int, int]:
    """All prompts, `concurrency` in flight at a time -> (steps, generated tokens)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending, steps, tokens = list(enumerate(prompts)), 0, 0
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.sequences) < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(f"p{i}-{time.monotonic_ns()}", prompt, params)
        for out in engine.step():
            tokens += len(out.token_ids)
        steps += 1
    return steps, tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sizes", default="1,4,16", help="fixed tree sizes in nodes (1: plain), then adaptive")
    parser.add_argument("--int8-linear", action="store_true")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    args = parser.parse_args(argv)
    engine = LLMEngine(EngineConfig(max_num_seqs=args.concurrency, int8_linear=args.int8_linear,
                                    cuda_graphs=not args.no_cuda_graphs, kv_cache_memory_gb=0.5,
                                    prefix_caching=False))   # every variant computes its prompts
    greedy = model_runner.greedy_tokens
    timer = instrument(engine)
    model_runner.greedy_tokens = timer.wrap("greedy", greedy)
    tokenizer = engine.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": MIXED[i % len(MIXED)]}])
               for i in range(args.prompts)]   # past the 16 evaluation prompts, again from the first
    graphs = engine.runner.graphs is not None
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {engine.device}"
          f"{' ' + torch.cuda.get_device_name(engine.device) if engine.device.type == 'cuda' else ''}, "
          f"graphs {'on' if graphs else 'off'}, {torch.get_num_threads()} threads, {args.prompts} prompts x "
          f"{args.max_tokens} tokens, {args.concurrency} at a time; ms per step")
    print(f"| tree | tokens a step | step | {' | '.join(PARTS)} | other | tokens/s |")
    print("|---" * (len(PARTS) + 5) + "|")
    try:
        run(engine, prompts[:1], 1, 8)  # warm-up
        for size in [int(s) for s in args.sizes.split(",")] + [None]:
            engine.set_tree_budget(size)
            timer.seconds.clear()
            started = time.perf_counter()
            steps, tokens = run(engine, prompts, args.concurrency, args.max_tokens)
            wall = time.perf_counter() - started
            ms = {part: timer.seconds[part] / steps * 1e3 for part in ("step",) + PARTS}
            other = ms["step"] - sum(ms[part] for part in PARTS)
            print(f"| {size or 'adaptive'} | {tokens / steps:.2f} | {ms['step']:.2f} | "
                  + " | ".join(f"{ms[part]:.2f}" for part in PARTS) + f" | {other:.2f} | {tokens / wall:.1f} |",
                  flush=True)
    finally:
        model_runner.greedy_tokens = greedy


if __name__ == "__main__":
    main()
