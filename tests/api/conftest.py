"""The real server, started once for the tests in this directory: `python -m server` on a free port.

GORGON_TEST_SERVER_ARGS adds flags (e.g. "--no-speculation" or "--heads none").
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from live_server import API_KEY, MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_QUEUE_SIZE

STARTUP_TIMEOUT_S = 600


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RunningServer:
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = [sys.executable, "-m", "server", "--port", str(port), "--api-key", API_KEY,
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-queue-size", str(MAX_QUEUE_SIZE), "--max-num-batched-tokens", "64",
            "--kv-cache-memory-gb", "0.25", "--shutdown-timeout", "5",
            *shlex.split(os.environ.get("GORGON_TEST_SERVER_ARGS", ""))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GORGON_") or k == "GORGON_HOME"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[2])
    running = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} while starting:\n{running.log()}")
        try:
            if httpx.get(running.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{running.log()}")
        time.sleep(0.5)
    yield running
    process.send_signal(signal.SIGTERM)  # graceful shutdown must exit cleanly
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the server ignored SIGTERM:\n{running.log()[-4000:]}")
    # uvicorn re-raises the signal once its graceful shutdown is done: -SIGTERM is a clean exit too
    assert code in (0, -signal.SIGTERM), f"the server exited with {code}:\n{running.log()[-4000:]}"
    assert "engine thread stopped" in running.log()


@pytest.fixture(scope="session")
def api_tokenizer(model_dir):
    from models.tokenizer import Tokenizer
    return Tokenizer(model_dir)


@pytest.fixture(scope="session")
def model_name(server) -> str:
    r = httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return r.json()["data"][0]["id"]
