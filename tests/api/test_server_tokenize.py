"""/v1/models/{id}, /tokenize and /detokenize on the real server."""
from __future__ import annotations

import httpx
import openai
import pytest
from live_server import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
WEATHER = {"type": "function", "function": {"name": "get_weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
        yield client


def test_a_model_is_retrieved_by_name(server, model_name, http):
    client = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)
    assert client.models.retrieve(model_name).id == model_name
    r = http.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_token_counts_are_those_the_requests_are_charged(server, model_name, http):
    client = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)
    for tools in (None, [WEATHER]):
        counted = http.post("/tokenize", json={"messages": MESSAGES, **({"tools": tools} if tools else {})}).json()
        reply = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=1,
                                               **({"tools": tools} if tools else {}))
        assert counted["count"] == len(counted["tokens"]) == reply.usage.prompt_tokens
    text = "The capital of France is"
    counted = http.post("/tokenize", json={"model": model_name, "prompt": text}).json()
    assert counted["count"] == client.completions.create(model=model_name, prompt=text, max_tokens=1).usage.prompt_tokens
    assert http.post("/detokenize", json={"tokens": counted["tokens"]}).json() == {"prompt": text}


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": "Hi", "messages": MESSAGES}, "messages"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
])
def test_bad_requests_are_400(http, route, body, param):
    r = http.post(route, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
