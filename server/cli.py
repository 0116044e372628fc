"""`gorgon serve` (also `python -m server`) and `gorgon train-heads`.

Every serve flag can also come from an environment variable: `--max-num-seqs` from
GORGON_MAX_NUM_SEQS, `--no-speculation` from GORGON_NO_SPECULATION=1, and so on. A flag on
the command line wins over the environment; defaults come from EngineConfig.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import fields

import uvicorn

from server.api.app import create_app
from server.async_engine import AsyncEngine
from server.config import EngineConfig
from server.loading import int8_by_default

ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
SHUTDOWN_GRACE_S = 5.0  # after the drain timeout, time for aborted streams to end before uvicorn cancels them

# flag, type, default, help (the env var is GORGON_ + the flag in capitals)
SERVE_OPTIONS = [
    ("--host", str, "127.0.0.1", "address to listen on"),
    ("--port", int, 8000, "port to listen on"),
    ("--model", str, None, "Hugging Face-style model directory (default: SmolLM2-135M-Instruct, fetched on first use)"),
    ("--heads", str, None, "head checkpoint (default: the shipped heads; 'none': no heads)"),
    ("--tree-budget", int, None, "fixed candidate-tree size in nodes (default: adapts to load)"),
    ("--lookup-tokens", int, ENGINE_DEFAULTS["lookup_tokens"],
     "longest lookup chain (from the request's own text, else the datastore) added to a tree (0: off)"),
    ("--datastore", str, None, "answers to draft lookup chains from (default: the heads' own; 'none': off)"),
    ("--api-key", str, None, "require 'Authorization: Bearer <key>' on /v1 routes"),
    ("--max-num-seqs", int, ENGINE_DEFAULTS["max_num_seqs"], "most requests running at once"),
    ("--max-model-len", int, None, "context length: prompt + max_tokens (default: the model's)"),
    ("--max-num-batched-tokens", int, ENGINE_DEFAULTS["max_num_batched_tokens"], "most tokens in one step"),
    ("--max-queue-size", int, ENGINE_DEFAULTS["max_queue_size"], "waiting requests beyond this get HTTP 503"),
    ("--kv-cache-memory-gb", float, ENGINE_DEFAULTS["kv_cache_memory_gb"], "memory for the paged KV cache"),
    ("--dtype", str, ENGINE_DEFAULTS["dtype"], "float32 | bfloat16 | float16"),
    ("--kv-cache-dtype", str, ENGINE_DEFAULTS["kv_cache_dtype"],
     "auto (the model's dtype) | float16 (beside a float32 model, on the CPU: twice the cached tokens)"),
    ("--device", str, ENGINE_DEFAULTS["device"], "auto | cpu | cuda[:N]"),
    ("--attention-backend", str, ENGINE_DEFAULTS["attention_backend"], "auto (Triton on CUDA, Gorgon's C++ kernel on the CPU) | torch | triton"),
    ("--shutdown-timeout", float, 20.0, "seconds in-flight requests may finish after SIGTERM"),
    ("--log-level", str, "info", "debug | info | warning | error"),
]
ENV_ALIASES = {"kv_cache_memory_gb": ("GORGON_KV_CACHE_MEMORY",)}  # docker-compose's name


def env_name(dest: str) -> str:
    return "GORGON_" + dest.upper()


def env_value(dest: str) -> str | None:
    for name in (env_name(dest), *ENV_ALIASES.get(dest, ())):
        value = os.environ.get(name)
        if value:  # an empty variable counts as unset (docker-compose passes those)
            return value
    return None


def env_flag(dest: str, default: bool = False) -> bool:
    """A switch from the environment: 1/true/yes/on or 0/false/no/off; unset (or empty): default."""
    value = (env_value(dest) or ("on" if default else "")).strip().lower()
    if value not in TRUE + FALSE:
        raise SystemExit(f"{env_name(dest)} must be one of {TRUE + FALSE[:-1]}, got {value!r}")
    return value in TRUE


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, help_text in SERVE_OPTIONS:
        dest = flag[2:].replace("-", "_")
        from_env = env_value(dest)
        parser.add_argument(flag, type=kind, default=default if from_env is None else from_env,
                            help=f"{help_text} [env {env_name(dest)}; default {default}]")
    parser.add_argument("--int8-linear", action=argparse.BooleanOptionalAction,
                        default=None if env_value("int8_linear") is None else env_flag("int8_linear"),
                        help="CPU: the model's 4/8-bit weights multiply activations rounded to 8 bits in integer "
                             "arithmetic, as llama.cpp does (AVX-512 VNNI; ~1.7x faster decoding, outputs close to, "
                             "not equal to, the exact fp32 product); --no-int8-linear: exact fp32 products "
                             "[env GORGON_INT8_LINEAR; default: on where the CPU runs it, for float32 on the CPU]")
    parser.add_argument("--no-speculation", action="store_true", default=env_flag("no_speculation"),
                        help="plain one-token-per-step decoding with the same engine [env GORGON_NO_SPECULATION]")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                        default=env_flag("prefix_caching", ENGINE_DEFAULTS["prefix_caching"]),
                        help="keep the KV cache of every full block of prompts and answers after a request ends, "
                             "and start requests with the same beginning (a system prompt, a conversation's "
                             "earlier turns) after it; --no-prefix-caching computes every prompt whole "
                             "[env GORGON_PREFIX_CACHING; default on]")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                        default=env_flag("cuda_graphs", ENGINE_DEFAULTS["cuda_graphs"]),
                        help="CUDA with the triton backend: replay steps (prompt chunks, decodes, trees) and the "
                             "heads' drafts from CUDA graphs captured at start-up instead of launching every kernel "
                             "from Python; --no-cuda-graphs launches them eagerly [env GORGON_CUDA_GRAPHS; default on]")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    int8 = args.int8_linear
    if int8 is None:   # neither --int8-linear nor --no-int8-linear (nor GORGON_INT8_LINEAR)
        int8 = int8_by_default(args.device, args.dtype, args.attention_backend)
    return EngineConfig(model=args.model, heads=args.heads, speculation=not args.no_speculation,
                        tree_budget=args.tree_budget, lookup_tokens=args.lookup_tokens,
                        datastore=args.datastore, dtype=args.dtype, int8_linear=int8,
                        device=args.device, cuda_graphs=args.cuda_graphs,
                        attention_backend=args.attention_backend, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_queue_size=args.max_queue_size, kv_cache_memory_gb=args.kv_cache_memory_gb,
                        kv_cache_dtype=args.kv_cache_dtype, prefix_caching=args.prefix_caching)


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS).lower()}, got {args.log_level!r}")
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    try:
        config = engine_config(args)
    except ValueError as e:
        parser.error(str(e))
    engine = AsyncEngine(config)
    app = create_app(engine, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout)
    # uvicorn's own graceful timeout is a backstop: our drain aborts what is left first
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                    log_level=args.log_level.lower(),
                                    timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_GRACE_S)
    server = GorgonServer(engine, uvicorn_config, drain_timeout=args.shutdown_timeout)
    server.run()
    if engine.load_error is not None:
        logging.getLogger("gorgon").error("exiting: the model failed to load (%s)", engine.load_error)
        return 1
    return 0 if server.started else 1


class GorgonServer(uvicorn.Server):
    """uvicorn's server with Gorgon's shutdown: on SIGTERM/SIGINT refuse new requests at once,
    let running ones finish for `drain_timeout` s, then abort the rest (their streams end
    cleanly with an error event and [DONE]); exit when the model fails to load."""

    def __init__(self, engine: AsyncEngine, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit and self.loop is not None:
            self.engine.stop_accepting()   # /health turns 503; new requests are refused
            self.loop.call_soon_threadsafe(self.loop.call_later, self.drain_timeout, self._abort_the_rest)
        super().handle_exit(sig, frame)    # uvicorn stops listening and waits for open connections

    def _abort_the_rest(self) -> None:
        aborted = self.engine.abort_all()
        if aborted:
            logging.getLogger("gorgon").warning("shutdown: aborted %d request(s) still running after %.0f s",
                                                aborted, self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.load_error is not None:
            return True
        return await super().on_tick(counter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gorgon", description="Gorgon: speculative multi-head decoding server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_options(serve_parser)
    commands.add_parser("train-heads", help="train Medusa-style heads for a base model (see train-heads --help)",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]  # `python -m server --port 9000` means serve (also for --help)
    if argv[0] == "train-heads":
        from models.train_heads import main as train_heads_main
        return train_heads_main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    return serve(args, parser)
