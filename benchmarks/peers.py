"""Gorgon against its peers on one machine, in one run: the same prompts, the same model.

    python -m benchmarks.peers [--install-peers] [--max-tokens 64] [--requests 4]
                               [--concurrency 1,4,16] [--peers gorgon,gorgon-plain,llama.cpp,transformers]

Peers, each measured here and now (a peer that cannot be installed or run is reported as
such, with the reason, never filled in from elsewhere):

- ``gorgon``: ``python -m server`` with adaptive speculation (the default), as a subprocess
  on a free port. Heads: ``--heads`` (default: the shipped heads; when the package has none
  yet, untrained heads written by this command, and the table says so).
- ``gorgon-plain``: the same server with ``--no-speculation``.
- ``llama.cpp``: llama-cpp-python's OpenAI server (``python -m llama_cpp.server``) on the
  same GGUF, 2 threads, ``interrupt_requests`` off so that concurrent requests queue instead
  of cutting each other off (it serves one request at a time). ``--install-peers`` installs
  ``llama-cpp-python[server]==0.3.36`` into its own venv under ~/.cache/gorgon/peers/
  (it compiles from source: about 10 minutes).
- ``transformers``: ``generate`` in this process on the Hugging Face-style directory, fp32;
  concurrency c means one batched ``generate`` over c left-padded prompts (static batching:
  all c requests arrive together and leave together).

The servers are driven by one asyncio + httpx OpenAI-compatible streaming client
(``/v1/chat/completions`` with ``stream: true``, greedy, end-of-sequence suppressed where the
server allows it so every request makes ``--max-tokens`` tokens). At each concurrency c,
max(c, --requests) requests over the evaluation prompts (benchmarks/eval_prompts.py) run
with at most c in flight. Reported per peer and c:

- throughput: completion tokens / wall time of the level;
- batch-1 tokens/s (c = 1): decode rate of one stream, tokens after the first / time from
  the first to the last token;
- TTFT p50/p99: request sent -> first content event;
- ITL p50/p99: gaps between content events, a gap whose event carries n tokens (a
  speculative step may send several) counted as n gaps of gap/n; n is the event's text
  re-tokenized with the model's tokenizer.

Writes PNG plots to docs/img/ and appends a Markdown section (date, machine, command) to
docs/benchmarks.md; raw numbers go to --json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from benchmarks.eval_prompts import CHAT, CODE

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_SPEC = "llama-cpp-python[server]==0.3.36"
ALL_PEERS = ("gorgon", "gorgon-plain", "llama.cpp", "transformers")
LABELS = {"gorgon": "Gorgon adaptive speculation", "gorgon-plain": "Gorgon --no-speculation",
          "llama.cpp": "llama.cpp (llama-cpp-python server)", "transformers": "transformers generate"}
# chat and code prompts alternated, so that any first n mix both kinds
PROMPTS = [p for pair in zip(CHAT, CODE) for p in pair]


def gorgon_home() -> Path:
    from models.fetch import gorgon_home as home
    return home()


def peers_dir() -> Path:
    return gorgon_home() / "peers"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# measurements

@dataclass
class RequestTrace:
    sent: float
    events: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in event)
    usage_tokens: int | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else sum(n for _, n in self.events)


@dataclass
class Level:
    concurrency: int
    wall_s: float
    traces: list[RequestTrace]

    def summary(self) -> dict:
        ok = [t for t in self.traces if t.error is None and t.events]
        ttft = [t.events[0][0] - t.sent for t in ok]
        itl: list[float] = []
        decode_tokens = decode_time = 0.0
        for t in ok:
            for (prev, _), (now, n) in zip(t.events, t.events[1:]):
                itl += [(now - prev) / max(n, 1)] * max(n, 1)
            if len(t.events) > 1:
                decode_tokens += sum(n for _, n in t.events[1:])
                decode_time += t.events[-1][0] - t.events[0][0]
        tokens = sum(t.tokens for t in ok)
        ms = lambda v: None if v is None else round(v * 1e3, 1)  # noqa: E731
        return {
            "concurrency": self.concurrency, "requests": len(self.traces), "failed": len(self.traces) - len(ok),
            "errors": sorted({t.error for t in self.traces if t.error})[:3],
            "tokens": tokens, "wall_s": round(self.wall_s, 2),
            "throughput_tok_s": round(tokens / self.wall_s, 2) if self.wall_s > 0 else None,
            "stream_tok_s": round(decode_tokens / decode_time, 2) if decode_time > 0 else None,
            "ttft_p50_ms": ms(percentile(ttft, 0.5)), "ttft_p99_ms": ms(percentile(ttft, 0.99)),
            "itl_p50_ms": ms(percentile(itl, 0.5)), "itl_p99_ms": ms(percentile(itl, 0.99)),
        }


class Tokens:
    """Counts the tokens in a piece of streamed text with the model's own tokenizer."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def __call__(self, text: str) -> int:
        return max(1, len(self.tok.encode(text, add_special_tokens=False).ids)) if text else 0


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, count: Tokens) -> RequestTrace:
    trace = RequestTrace(sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                trace.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return trace
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    trace.error = f"error event: {chunk['error']}"
                    return trace
                if chunk.get("usage"):
                    trace.usage_tokens = chunk["usage"].get("completion_tokens")
                text = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                               for c in chunk.get("choices") or [])
                if text:
                    trace.events.append((time.perf_counter(), count(text)))
            if not done:
                trace.error = "stream ended without [DONE]"
            elif not trace.events:
                trace.error = "no content"
    except Exception as exc:  # noqa: BLE001 - recorded, and the level goes on
        trace.error = f"{type(exc).__name__}: {exc}"[:200]
    return trace


async def run_level(base_url: str, concurrency: int, n_requests: int, make_body, count: Tokens,
                    timeout_s: float) -> Level:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(i: int) -> RequestTrace:
            async with sem:
                return await stream_one(client, "/v1/chat/completions", make_body(PROMPTS[i % len(PROMPTS)]), count)

        started = time.perf_counter()
        traces = await asyncio.gather(*(one(i) for i in range(n_requests)))
        return Level(concurrency, time.perf_counter() - started, list(traces))


# ---------------------------------------------------------------------------------------
# servers as subprocesses

class ServerProcess:
    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, health: str, env=None):
        self.name, self.argv, self.port, self.log_path, self.health = name, argv, port, log_path, health
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} while starting: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            time.sleep(1.0)
        raise RuntimeError(f"not healthy after {timeout_s:.0f} s: {self.tail()}")

    def tail(self, n: int = 3) -> str:
        self.log.flush()
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


def ensure_heads(requested: str | None, out_dir: Path) -> tuple[str | None, str]:
    """-> (value for --heads, description for the table)."""
    from models.head_checkpoint import DEFAULT_HEADS_DIR, GORGON_WEIGHTS, MEDUSA_WEIGHTS
    if requested:
        return requested, f"heads `{requested}`"
    if (DEFAULT_HEADS_DIR / GORGON_WEIGHTS).exists() or any((DEFAULT_HEADS_DIR / w).exists() for w in MEDUSA_WEIGHTS):
        return None, "the shipped heads"
    # No shipped heads yet: freshly initialized (untrained) heads, so that the adaptive policy
    # and the tree machinery run for real; they accept little, so this measures speculation's
    # overhead and whether adaptation keeps it from costing anything, not its best case.
    import torch

    from models.head_checkpoint import prior_accuracies, save_heads
    from models.heads import HeadsConfig, MedusaHeads
    path = out_dir / "untrained-heads"
    if not (path / GORGON_WEIGHTS).exists():
        torch.manual_seed(0)
        heads = MedusaHeads(HeadsConfig())
        save_heads(path, heads, prior_accuracies(heads.config.num_heads), base_model="SmolLM2-135M-Instruct",
                   base_checksum="")
    return str(path), ("UNTRAINED heads (no shipped heads in the package at the time of the run; "
                       "measures speculation overhead, not its benefit)")


def llama_cpp_python(install: bool, log_path: Path, wait_s: float = 0.0) -> Path:
    venv = peers_dir() / "llama-cpp-venv"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import llama_cpp, llama_cpp.server, uvicorn; print(llama_cpp.__version__)"]
    deadline = time.monotonic() + wait_s  # another process may be installing it right now
    while True:
        if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
            return py
        if time.monotonic() >= deadline:
            break
        print(f"  waiting for llama-cpp-python in {venv} ({deadline - time.monotonic():.0f} s left)", flush=True)
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
    if not install:
        raise RuntimeError(f"{LLAMA_CPP_SPEC} is not installed in {venv}; run with --install-peers")
    print(f"installing {LLAMA_CPP_SPEC} into {venv} (compiles from source, ~10 min; log {log_path})", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "1")}
    with open(log_path, "w") as log:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=log, stderr=log)
        rc = subprocess.run(["nice", "-n", "19", str(py), "-m", "pip", "install", LLAMA_CPP_SPEC],
                            stdout=log, stderr=log, env=env).returncode
    if rc != 0 or subprocess.run(check, capture_output=True).returncode != 0:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"pip install {LLAMA_CPP_SPEC} failed (status {rc}): {tail}")
    return py


# ---------------------------------------------------------------------------------------
# transformers in this process

class TimingStreamer:
    """A transformers streamer that records when each generated token (row-batch) arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(model_dir: Path, levels: list[int], n_requests: int, max_tokens: int, threads: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]

    def generate(batch: list[str]) -> tuple[float, list[float]]:
        enc = tok(batch, return_tensors="pt", padding=True)
        streamer = TimingStreamer()
        sent = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           streamer=streamer, pad_token_id=tok.pad_token_id)
        return sent, streamer.times

    generate(texts[:1])  # warm-up
    out = []
    for c in levels:
        traces = []
        started = time.perf_counter()
        n = max(c, n_requests)
        for first in range(0, n, c):
            batch = [texts[(first + j) % len(texts)] for j in range(min(c, n - first))]
            sent, times = generate(batch)
            for _ in batch:  # every row of a static batch sees the same token times
                traces.append(RequestTrace(sent=sent, events=[(t, 1) for t in times], usage_tokens=len(times)))
        out.append(Level(c, time.perf_counter() - started, traces).summary())
        print(f"  transformers c={c}: {out[-1]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------
# the run

def measure_server(server: ServerProcess, levels: list[int], n_requests: int, make_body, count: Tokens,
                   timeout_s: float) -> list[dict]:
    server.start(timeout_s=600)
    try:
        def warm_body(prompt: str) -> dict:
            return {**make_body(prompt), "max_tokens": 4}

        warm = asyncio.run(run_level(server.url, 1, 1, warm_body, count, timeout_s))  # warm-up, not reported
        if warm.traces[0].error:
            raise RuntimeError(f"warm-up request failed: {warm.traces[0].error}")
        out = []
        for c in levels:
            out.append(asyncio.run(run_level(server.url, c, max(c, n_requests), make_body, count, timeout_s)).summary())
            print(f"  {server.name} c={c}: {out[-1]}", flush=True)
        return out
    finally:
        server.stop()


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}" + (f", load average at start {load[0]:.1f}" if load else ""))


def fmt(v, digits=0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(results: dict, args, command: str, heads_note: str, plots: list[str], started: str,
             md_dir: Path) -> str:
    lines = [f"## Peers: Gorgon vs llama.cpp vs transformers ({started})", "",
             f"- command: `{command}`",
             f"- machine: {results['machine']}",
             "- model: SmolLM2-135M-Instruct; Gorgon and transformers fp32 from the converted directory, "
             "llama.cpp on the Q4_1 GGUF (4-bit weights: not the same arithmetic, the same network)",
             f"- workload: {args.max_tokens} new tokens per request, greedy, chat template, evaluation prompts "
             f"(benchmarks/eval_prompts.py); at concurrency c, max(c, {args.requests}) requests with c in flight. "
             f"A deliberately small run.",
             f"- Gorgon adaptive ran with {heads_note}.",
             "- llama.cpp: `python -m llama_cpp.server`, 2 threads, `interrupt_requests` off (it serves one "
             "request at a time; the others wait in line).",
             "- transformers: `generate` in the benchmark's process, fp32; concurrency c = one static batch of "
             "c prompts (all arrive and leave together).",
             f"- {results['load_note']}", ""]
    lines += ["| peer | batch-1 tok/s | c | throughput tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in results["peers"]:
        res = results["peers"][name]
        if res.get("error"):
            lines.append(f"| {LABELS[name]} | not measured: {res['error'].replace('|', '/')} | | | | | | | |")
            continue
        b1 = next((lv["stream_tok_s"] for lv in res["levels"] if lv["concurrency"] == 1), None)
        for i, lv in enumerate(res["levels"]):
            lines.append(f"| {LABELS[name] if i == 0 else ''} | {fmt(b1, 1) if i == 0 else ''} | {lv['concurrency']} | "
                         f"{fmt(lv['throughput_tok_s'], 1)} | {fmt(lv['ttft_p50_ms'])} | {fmt(lv['ttft_p99_ms'])} | "
                         f"{fmt(lv['itl_p50_ms'], 1)} | {fmt(lv['itl_p99_ms'], 1)} | {lv['failed']}/{lv['requests']} |")
    lines += ["", "batch-1 tok/s: decode rate of one stream at c = 1 (after its first token). ITL: a streamed event "
              "carrying n tokens counts as n gaps of gap/n. p99 over this few requests is close to the maximum.", ""]
    lines += [f"![{Path(p).stem}]({Path(os.path.relpath(p, md_dir)).as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(results: dict, img_dir: Path, subtitle: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    measured = {n: r["levels"] for n, r in results["peers"].items() if not r.get("error")}
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, levels in measured.items():
        xs = [lv["concurrency"] for lv in levels]
        ax.plot(xs, [lv["throughput_tok_s"] or 0 for lv in levels], marker="o", label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks([lv for lv in results["levels"]], [str(lv) for lv in results["levels"]])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s (all requests)")
    ax.set_title("Throughput, SmolLM2-135M-Instruct\n" + subtitle, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = img_dir / "peers_throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")):
        for i, (name, levels) in enumerate(measured.items()):
            xs = [lv["concurrency"] for lv in levels]
            line, = ax.plot(xs, [lv[f"{key}_p50_ms"] or 0 for lv in levels], marker="o", label=f"{LABELS[name]} p50")
            ax.plot(xs, [lv[f"{key}_p99_ms"] or 0 for lv in levels], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{LABELS[name]} p99")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(results["levels"], [str(lv) for lv in results["levels"]])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("ms")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    p = img_dir / "peers_latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(ALL_PEERS), help=f"subset of {','.join(ALL_PEERS)}")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per level at least (default 4)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="threads for llama.cpp and transformers")
    parser.add_argument("--heads", default=None, help="Gorgon head checkpoint (default: the shipped heads)")
    parser.add_argument("--install-peers", action="store_true", help=f"pip install {LLAMA_CPP_SPEC} if missing")
    parser.add_argument("--peer-install-wait", type=float, default=0.0,
                        help="seconds to wait for an llama-cpp-python install that another process is running")
    parser.add_argument("--timeout", type=float, default=900, help="per-request timeout in seconds")
    parser.add_argument("--img-dir", default=str(REPO / "docs" / "img"))
    parser.add_argument("--markdown", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--json", default=None, help="raw results (default: ~/.cache/gorgon/peers/results.json)")
    parser.add_argument("--note", default=None, help="a line about the conditions, e.g. 'machine shared with a training job'")
    parser.add_argument("--no-write", action="store_true", help="print only; write neither plots nor docs")
    args = parser.parse_args(argv)

    from models.fetch import default_gguf_path, default_model_dir
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(ALL_PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {ALL_PEERS}")
    levels = [int(c) for c in args.concurrency.split(",")]
    work = peers_dir()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, gguf = default_model_dir(), default_gguf_path()
    if not (model_dir / "config.json").exists() or not gguf.exists():
        subprocess.run([sys.executable, "-m", "models.fetch"], cwd=REPO, check=True)
    count = Tokens(model_dir)
    command = "python -m benchmarks.peers " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    load_note = args.note or (
        f"LOADED MACHINE: load average {load:.1f} on {os.cpu_count()} CPUs at the start (other jobs were "
        f"running); compare the peers inside this run only." if load > 0.5 * (os.cpu_count() or 1)
        else "the machine was otherwise idle at the start.")
    results = {"date": started, "machine": machine_line(), "command": command, "levels": levels,
               "max_tokens": args.max_tokens, "requests": args.requests, "load_note": load_note, "peers": {}}
    print(f"# {started}  {results['machine']}\n# {load_note}", flush=True)

    def gorgon_body(prompt: str) -> dict:
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    def llama_body(prompt: str) -> dict:
        # no ignore_eos there: the end-of-turn and end-of-text tokens are pushed down instead
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "logit_bias": {str(eos_id): -100.0 for eos_id in eos_ids}}

    eos_ids = sorted({i for i in (count.tok.token_to_id("<|im_end|>"), count.tok.token_to_id("<|endoftext|>"))
                      if i is not None})
    heads_arg, heads_note = None, "-"
    for name in peers:
        print(f"== {LABELS[name]}", flush=True)
        try:
            if name in ("gorgon", "gorgon-plain"):
                port = free_port()
                argv_ = [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning",
                         "--max-num-seqs", str(max(levels))]
                if name == "gorgon":
                    heads_arg, heads_note = ensure_heads(args.heads, work)
                    if heads_arg:
                        argv_ += ["--heads", heads_arg]
                else:
                    argv_ += ["--no-speculation", "--heads", "none"]
                server = ServerProcess(name, argv_, port, work / f"{name}.log", "/health")
                res = {"levels": measure_server(server, levels, args.requests, gorgon_body, count, args.timeout),
                       "argv": argv_[1:]}
            elif name == "llama.cpp":
                py = llama_cpp_python(args.install_peers, work / "install.log", args.peer_install_wait)
                port = free_port()
                argv_ = [str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                         "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                         "--n_ctx", "2048", "--interrupt_requests", "False"]
                server = ServerProcess(name, argv_, port, work / "llama-cpp-server.log", "/v1/models")
                res = {"levels": measure_server(server, levels, args.requests, llama_body, count, args.timeout),
                       "argv": argv_[1:]}
            else:
                res = {"levels": run_transformers(model_dir, levels, args.requests, args.max_tokens, args.threads)}
            bad = [lv for lv in res["levels"] if lv["failed"]]
            if bad and all(lv["failed"] == lv["requests"] for lv in res["levels"]):
                res = {"error": f"every request failed: {bad[0]['errors']}"}
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not assumed
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        results["peers"][name] = res

    json_path = Path(args.json) if args.json else work / "results.json"
    json_path.write_text(json.dumps(results, indent=1))
    subtitle = f"{started}, {os.cpu_count()} CPUs" + (", loaded machine" if "LOADED" in load_note else "") + \
        f", {args.max_tokens} new tokens, greedy"
    plots = [] if args.no_write else plot(results, Path(args.img_dir), subtitle)
    md = Path(args.markdown)
    section = markdown(results, args, command, heads_note, plots, started, md.parent)
    print("\n" + section)
    if not args.no_write:
        # append (others add their own sections to the same file): never rewrite what is there
        new = not md.exists() or md.stat().st_size == 0
        with open(md, "a") as f:
            f.write(("# Benchmarks\n\n" if new else "\n") + section)
        print(f"appended to {md}; plots {plots}; raw numbers {json_path}")


if __name__ == "__main__":
    main()
