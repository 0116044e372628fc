"""The real server, started once for the tests in this directory (see live_server.py).

GORGON_TEST_SERVER_ARGS adds flags, e.g. "--no-speculation" or "--heads none".
"""
from __future__ import annotations

import os
import shlex
import signal

import httpx
import pytest
from live_server import API_KEY, RunningServer, start_server


@pytest.fixture(scope="session")
def server_args() -> list[str]:
    return shlex.split(os.environ.get("GORGON_TEST_SERVER_ARGS", ""))


@pytest.fixture(scope="session")
def server(tmp_path_factory, server_args) -> RunningServer:
    running = start_server(["--api-key", API_KEY, "--shutdown-timeout", "5", *server_args],
                           tmp_path_factory.mktemp("server") / "server.log")
    yield running
    code = running.stop()
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
