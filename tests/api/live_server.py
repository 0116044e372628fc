"""Starting the real server in a subprocess (`python -m server`) and reading its metrics."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "sk-gorgon-test"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
MAX_QUEUE_SIZE = 32
STARTUP_TIMEOUT_S = 600
# small limits keep the startup cost measurement and the KV cache small
BASE_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
             "--max-queue-size", str(MAX_QUEUE_SIZE), "--max-num-batched-tokens", "64", "--kv-cache-memory-gb", "0.25"]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (uvicorn re-raises the signal after a clean shutdown: -15)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server ignored SIGTERM:\n{self.log()[-4000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra_args: list[str], log_path: Path) -> RunningServer:
    """Start `python -m server` on a free port and wait until /health answers 200."""
    port = free_port()
    args = [sys.executable, "-m", "server", "--port", str(port), *BASE_ARGS, *extra_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GORGON_") or k == "GORGON_HOME"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[2])
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode} while starting:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()}")
        time.sleep(0.5)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (`name{labels} value`); 0 when absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{[^}]*\})?") + r" (\S+)"
    values = [float(m.group(m.lastindex)) for m in re.finditer("^" + pattern + "$", text, re.MULTILINE)]
    return sum(values)
