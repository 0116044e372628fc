"""The real server over raw HTTP: error statuses and shapes, overload, disconnects, health, metrics."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from live_server import API_KEY, MAX_MODEL_LEN, MAX_QUEUE_SIZE, metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
        yield client


def assert_serving(http, model_name):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def assert_error(r: httpx.Response, status: int, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    assert body["error"]["param"] == param
    return body["error"]


def test_health_and_metrics_are_open(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("gorgon_spec_decode_steps_total", "gorgon_spec_decode_draft_tokens_total",
                 "gorgon_spec_decode_accepted_tokens_total", "gorgon_num_requests_running",
                 "gorgon_time_to_first_token_seconds_bucket", "gorgon_kv_cache_usage_ratio"):
        assert name in text, name


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_api_key_is_401(server, model_name, headers, http):
    r = httpx.post(server.v1 + "/completions", headers=headers, json={"prompt": "Hi", "max_tokens": 1})
    assert assert_error(r, 401)["code"] == "invalid_api_key"
    assert_serving(http, model_name)


@pytest.mark.parametrize("route, body, status, param", [
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "model": "nope"}, 404, "model"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0, "logprobs": 1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "guided_regex": "(("}, 400, "guided_regex"),
    ("/v1/completions", {"prompt": "Hi", "guided_json": "[1]"}, 400, "guided_json"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}}, 400, "response_format"),
])
def test_invalid_requests(http, model_name, route, body, status, param):
    assert_error(http.post(route, json=body), status, param)
    assert_serving(http, model_name)


def test_malformed_json_is_400(http, model_name):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    assert_serving(http, model_name)


def test_prompt_longer_than_the_context_states_the_numbers(http, model_name, api_tokenizer):
    prompt = "hello " * (MAX_MODEL_LEN + 10)
    n = len(api_tokenizer.encode(prompt))
    error = assert_error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert f"{MAX_MODEL_LEN} tokens" in error["message"] and f"{n} in the prompt" in error["message"]
    assert_serving(http, model_name)


def test_queue_full_is_503_with_retry_after(server, http, model_name):
    async def flood():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300,
                                     limits=httpx.Limits(max_connections=200)) as client:
            body = {"prompt": "Hi", "max_tokens": 1}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(3 * MAX_QUEUE_SIZE)))

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.status_code in (200, 503) for r in responses)
    assert refused[0].headers["retry-after"] == "1"
    assert assert_error(refused[0], 503)["code"] == "queue_full"
    assert_serving(http, model_name)


def running_and_waiting(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    return metric(text, "gorgon_num_requests_running"), metric(text, "gorgon_num_requests_waiting")


def test_disconnect_mid_stream_aborts_the_request(server, http, model_name):
    aborted_before = metric(httpx.get(server.url + "/metrics").text, "gorgon_requests_total",
                            'finish_reason="abort",status="aborted"')
    body = {"model": model_name, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            assert first["choices"][0]["delta"]["role"] == "assistant"
            next(line for line in lines if line.startswith("data: "))  # a content token: it is running
    deadline = time.monotonic() + 60
    while running_and_waiting(server) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_and_waiting(server) == (0, 0)
    aborted = metric(httpx.get(server.url + "/metrics").text, "gorgon_requests_total",
                     'finish_reason="abort",status="aborted"')
    assert aborted == aborted_before + 1
    assert_serving(http, model_name)


def test_a_non_streamed_request_is_aborted_when_its_client_gives_up(server, http, model_name):
    aborted_before = metric(httpx.get(server.url + "/metrics").text, "gorgon_requests_total",
                            'finish_reason="abort",status="aborted"')
    # far more tokens than the server makes in the 0.5 s the client waits (~150-250 tokens/s
    # sampled at batch 1 on 2 cores; greedy text repeats itself and its lookup chains can
    # keep several tokens a step: 480 greedy tokens came back within 1 s)
    body = {"model": model_name, "prompt": "Write a long essay.", "max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True,
            "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", headers=AUTH, json=body, timeout=0.5)
    deadline = time.monotonic() + 60
    while running_and_waiting(server) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_and_waiting(server) == (0, 0)
    aborted = metric(httpx.get(server.url + "/metrics").text, "gorgon_requests_total",
                     'finish_reason="abort",status="aborted"')
    assert aborted == aborted_before + 1
    assert_serving(http, model_name)
