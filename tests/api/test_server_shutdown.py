"""SIGTERM: running requests finish (up to --shutdown-timeout), the rest are cut off, the process exits."""
from __future__ import annotations

import signal
import threading

import httpx
import pytest
from live_server import MAX_MODEL_LEN, start_server


def stream_lines(url: str, body: dict, first_token: threading.Event, lines: list[str]) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first_token.set()
    except httpx.HTTPError as e:
        lines.append(f"error: {type(e).__name__}")
    finally:
        first_token.set()


@pytest.mark.slow
def test_sigterm_drains_then_aborts(tmp_path, server_args):
    # 1 s: the endless request below must not finish in it (plain sampled decoding of ~500
    # tokens at batch 1 takes ~2.6 s on 2 cores with the int8 default and cheaper sampling;
    # 3 s became too long, 8 s before that)
    server = start_server(["--shutdown-timeout", "1", *server_args], tmp_path / "server.log")
    short, endless = [], []
    short_started, endless_started = threading.Event(), threading.Event()
    prompt = {"prompt": "Once upon a time", "temperature": 0, "stream": True, "ignore_eos": True}
    # the endless request decodes plainly, one token a step: with speculation its 500 tokens
    # once finished inside the drain (typical acceptance at temperature 1.0 keeps most drafts)
    endless_body = {**prompt, "max_tokens": MAX_MODEL_LEN - 16, "temperature": 1.0, "speculate": False}
    threads = [threading.Thread(target=stream_lines, args=(server.url, {**prompt, "max_tokens": 4}, short_started, short)),
               threading.Thread(target=stream_lines, args=(server.url, endless_body, endless_started, endless))]
    for t in threads:
        t.start()
    assert short_started.wait(120) and endless_started.wait(120)
    code = server.stop()
    for t in threads:
        t.join(60)
    assert code in (0, -signal.SIGTERM)
    assert short[-1] == "data: [DONE]" and '"finish_reason":"length"' in short[-2]  # finished in time
    # cut off at the timeout, but cleanly: an error event, then [DONE]
    assert endless[-1] == "data: [DONE]" and "shutting down" in endless[-2] and len(endless) < 500
    log = server.log()
    assert "engine thread stopped" in log and "aborted 1 request(s)" in log
    assert "Exception in ASGI application" not in log and "timeout graceful shutdown exceeded" not in log
