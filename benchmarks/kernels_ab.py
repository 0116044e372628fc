"""The CPU kernels of another git revision against this checkout's, in one process.

    python -m benchmarks.kernels_ab [--base HEAD] [--sizes 1,4] [--concurrency 1]
                                    [--prompts 16] [--max-tokens 128] [--linear exact|int8]

Builds `models/csrc` as it is at --base (under its own module name, cached like the real
build) beside this checkout's build, makes one engine on each, and runs the evaluation
prompts greedily through both, prompt by prompt and tree size by tree size, the two engines
in turn (so that a slow spell of this shared machine hits both alike). Prints generated
tokens/s of each at every tree size, the ratio, and whether both generated the same tokens
(a kernel change meant to keep every bit must say yes).
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path
from unittest import mock

import torch

import models.cpu_kernels as ck
from benchmarks.eval_prompts import MIXED
from models.packed_linear import int8_supported
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def build_revision(revision: str):
    """The kernels' module built from models/csrc at `revision` (its sources kept in the temp
    folder, so that a second run finds the build up to date), and the commit's short hash."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    into = Path(tempfile.gettempdir()) / f"gorgon_kernels_{commit}"
    into.mkdir(exist_ok=True)
    listed = subprocess.run(["git", "ls-tree", "--name-only", f"{commit}:models/csrc"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    sources = tuple(n for n in listed if n.endswith(".cpp"))   # the revision's own files
    headers = tuple(sorted(n for n in listed if n.endswith(".h")))
    for name in sources + headers:
        text = subprocess.run(["git", "show", f"{commit}:models/csrc/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        if name == "cpu_decoder.cpp" and "py::module_local()" not in text:   # older revisions: two
            text = text.replace('(m, "CpuDecoder", ', '(m, "CpuDecoder", py::module_local(), ')   # builds clash
        source = into / name
        if not source.exists() or source.read_text() != text:   # unchanged files keep ninja's build
            source.write_text(text)
    return ck.build(f"gorgon_kernels_{commit}", into, sources, headers), commit


@contextlib.contextmanager
def kernels_in_use(kernels):
    """cpu_kernels() returns `kernels` meanwhile: the layers take theirs when the engine is
    built, attention and the small kernels at every step."""
    ck.cpu_kernels.cache_clear()
    try:
        with mock.patch.object(ck, "build", lambda *args, **kwargs: kernels):
            yield
    finally:
        ck.cpu_kernels.cache_clear()


def serve(engine: LLMEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams):
    """All prompts, `concurrency` at a time -> (tokens after each request's first, seconds, outputs)."""
    pending, outputs, tokens, seconds = list(enumerate(prompts)), {}, 0, 0.0
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.sequences) < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(f"ab{i}", prompt, params)
        started = time.perf_counter()
        for out in engine.step():
            seen = outputs.setdefault(out.request_id, [])
            tokens += len(out.token_ids) if seen else 0   # a first token measures the prompt, not decoding
            seen += out.token_ids
        seconds += time.perf_counter() - started
    return tokens, seconds, [outputs[f"ab{i}"] for i in range(len(prompts))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision whose kernels to compare against")
    parser.add_argument("--sizes", default="1,4", help="tree sizes in nodes (1: plain decoding)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=len(MIXED))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--linear", choices=("exact", "int8"), help="default: int8 where the CPU runs it")
    args = parser.parse_args(argv)
    current = ck.cpu_kernels()
    if current is None:
        raise SystemExit("Gorgon's CPU kernels do not run here")
    linear = args.linear or ("int8" if int8_supported() else "exact")
    config = EngineConfig(max_num_seqs=args.concurrency, int8_linear=linear == "int8", kv_cache_memory_gb=0.3,
                          prefix_caching=False)   # both builds compute their prompts
    base, commit = build_revision(args.base)
    builds = {commit: base, "this checkout": current}
    engines = {}
    for label, kernels in builds.items():
        with kernels_in_use(kernels):
            engines[label] = LLMEngine(config)
    tokenizer = engines["this checkout"].tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": MIXED[i % len(MIXED)]}])
               for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{linear} linear layers, {args.prompts} prompts x {args.max_tokens} tokens, "
          f"{args.concurrency} at a time; tokens/s")
    print(f"| tree | {commit} | this checkout | ratio | same tokens |")
    print("|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        totals = {label: [0, 0.0] for label in engines}
        same = True
        for start in range(0, len(prompts), args.concurrency):   # the engines in turn, a batch at a time
            batch, outputs = prompts[start:start + args.concurrency], []
            for label, engine in engines.items():
                engine.set_tree_budget(size)
                with kernels_in_use(builds[label]):
                    tokens, seconds, texts = serve(engine, batch, args.concurrency, params)
                totals[label][0] += tokens
                totals[label][1] += seconds
                outputs.append(texts)
            same &= outputs[0] == outputs[1]
        rates = [tokens / seconds for tokens, seconds in totals.values()]
        print(f"| {size} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.3f}x | {'yes' if same else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
