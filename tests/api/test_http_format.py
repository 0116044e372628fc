"""The HTTP layer's shapes (SSE framing, chunks, errors, auth) against a fake engine, in process.

The same behaviour is checked end to end against the real engine in test_server_*.py.
"""
import json

import pytest
from fastapi.testclient import TestClient

from api_fakes import FakeEngine
from server.api.app import create_app
from server.api.protocol import ChatCompletionChunk, ChatChunkChoice, CompletionRequest, DeltaMessage
from server.api.streams import SSE_DONE, sse
from server.async_engine import AsyncEngine
from server.config import EngineConfig

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client():
    engine = AsyncEngine(EngineConfig(max_queue_size=4), engine_factory=FakeEngine)
    with TestClient(create_app(engine, api_key=KEY, shutdown_timeout=1)) as c:
        assert engine.wait_until_loaded(5)
        c.engine = engine
        yield c


def events(response) -> list:
    """Parse an SSE body strictly: every event is `data: ...` followed by a blank line."""
    body = response.text
    assert body.endswith("\n\n")
    out = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_sse_framing():
    assert sse({"a": 1}) == 'data: {"a":1}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
    chunk = ChatCompletionChunk(id="x", model="m", choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content="hi"))])
    data = json.loads(sse(chunk)[6:])
    assert data["choices"][0] == {"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}
    assert data["object"] == "chat.completion.chunk" and data["usage"] is None


def test_sampling_params_from_request():
    body = CompletionRequest(prompt="x", seed=5, n=3, stop="END", temperature=0, top_k=-1)
    params = [body.sampling_params(7, i) for i in range(3)]
    assert [p.seed for p in params] == [5, 6, 7]
    assert params[0].stop == ("END",) and params[0].top_k == 0 and params[0].is_greedy
    assert CompletionRequest(prompt=[1, 2]).prompt == [1, 2]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]
    assert params[0].cache_salt is None
    assert CompletionRequest(prompt="x", cache_salt="tenant-7").sampling_params(1).cache_salt == "tenant-7"


def test_an_empty_cache_salt_is_400(client):
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "one", "max_tokens": 1, "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_completion_and_usage(client):
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "one two", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"] == [{"index": 0, "text": " one two three", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["object"] == "text_completion" and body["model"] == "fake-model"


def test_completion_stream_echo_n_and_usage(client):
    r = client.post("/v1/completions", headers=AUTH, json={
        "prompt": ["one", "two three"], "max_tokens": 2, "n": 2, "echo": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r)
    assert evs[-1] == "[DONE]"
    usage = evs[-2]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                                                         "prompt_tokens_details": {"cached_tokens": 0}}
    texts = {}
    for e in evs[:-2]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: "one one two", 1: "one one two", 2: "two three one two", 3: "two three one two"}
    finals = [c for e in evs[:-2] for c in e["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1, 2, 3]


def test_chat_stream_shape(client):
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "fake-model", "messages": [{"role": "user", "content": "two"}], "max_completion_tokens": 2,
        "stream": True})
    evs = events(r)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"] for e in evs[1:-2]] == [{"content": " one"}, {"content": " two"}]
    assert evs[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert evs[-1] == "[DONE]"


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer nope"}, 401), (AUTH, 200)])
def test_api_key(client, headers, status):
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


@pytest.mark.parametrize("kwargs, status, param", [
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, None),
    ({"json": {"prompt": "x", "max_tokens": 0}}, 400, "max_tokens"),
    ({"json": {"prompt": "x", "temperature": 9}}, 400, "temperature"),
    ({"json": {"max_tokens": 2}}, 400, "prompt"),
    ({"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model"),
    ({"json": {"prompt": "x", "logprobs": 6}}, 400, "logprobs"),
    ({"json": {"prompt": "x", "logprobs": 2, "echo": True, "stream": True}}, 400, "stream"),
    ({"json": {"prompt": "x", "max_tokens": 0}}, 400, "max_tokens"),
    ({"json": {"prompt": "x", "stop": [""]}}, 400, None),
    ({"json": {"prompt": "one two", "max_tokens": 63}}, 400, "max_tokens"),
    ({"json": {"prompt": [99999]}}, 400, "prompt"),
])
def test_errors_have_openai_shape(client, kwargs, status, param):
    kwargs.setdefault("headers", {}).update(AUTH)
    r = client.post("/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert client.post("/v1/completions", headers=AUTH, json={"prompt": "one", "max_tokens": 1}).status_code == 200


def test_context_error_states_the_numbers(client):
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "one two", "max_tokens": 63})
    assert "64 tokens" in r.json()["error"]["message"] and "65 tokens (2 in the prompt, 63" in r.json()["error"]["message"]


def test_queue_full_is_503_with_retry_after(client):
    engine = client.engine.engine
    engine.waiting = 4
    try:
        r = client.post("/v1/completions", headers=AUTH, json={"prompt": "one"})
    finally:
        engine.waiting = 0
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])


def test_chat_content_parts_and_n_streams(client):
    r = client.post("/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "system", "content": None},
                     {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": " two"}]}],
        "max_tokens": 1, "n": 2, "stream": True})
    evs = events(r)
    roles = [e["choices"][0]["index"] for e in evs[:-1] if e["choices"][0]["delta"].get("role")]
    finishes = [e["choices"][0]["index"] for e in evs[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1] and evs[-1] == "[DONE]"


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"stop": [str(i) for i in range(9)]}, "stop"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_unsupported_chat_parameters_are_400(client, body, param):
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"messages": [{"role": "user", "content": "one"}], "max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("body, param", [
    ({"logit_bias": {"one": 5}}, "logit_bias"),
    ({"logit_bias": {"01": 5, "1": 6}}, "logit_bias"),
    ({"logit_bias": {"1.0": 5}}, "logit_bias"),
    ({"stop_token_ids": [999999], "min_tokens": 1, "max_tokens": 2}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 2}, "min_tokens"),
])
def test_out_of_range_logit_changes_are_400(client, body, param):
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"messages": [{"role": "user", "content": "one"}], "max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_usage_counts_cached_prompt_tokens_once_per_prompt():
    """prompt_tokens_details.cached_tokens: each prompt once, as prompt_tokens counts it; for
    n > 1 the fewest any of its choices found cached."""
    from server.api.serving import Batch
    from server.outputs import RequestOutput
    batch = Batch("cmpl-1", [[1] * 40, [2] * 20], n=2)
    for i, cached in enumerate([32, 16, 0, 16]):
        batch.choices[i].add(RequestOutput(f"cmpl-1-{i}", "x", [5], "stop", 40 if i < 2 else 20, 1,
                                           num_cached_tokens=cached))
    assert batch.usage.model_dump() == {"prompt_tokens": 60, "completion_tokens": 4, "total_tokens": 64,
                                        "prompt_tokens_details": {"cached_tokens": 16}}


def test_completion_logprobs_shape_with_split_characters(api_tokenizer):
    """A character split over tokens: each piece spells U+FFFD, text_offset still points into
    the decoded text, top_logprobs holds the token itself first and, where two alternatives
    spell alike, the likelier one's value."""
    from server.api.logprobs import LogprobFormatter
    from server.outputs import TokenLogprob
    ids = api_tokenizer.encode("日本 is fine")
    pieces = [i for i in ids if api_tokenizer.token_bytes(i).decode("utf-8", errors="replace") == "\ufffd"]
    assert len(pieces) >= 2, "the test needs a character split over tokens"
    entries = [TokenLogprob(-0.25, ((pieces[0], -0.5), (pieces[1], -0.75))) for _ in ids]
    out = LogprobFormatter(api_tokenizer).completion(ids, entries)
    text = api_tokenizer.decode(ids)
    assert out.text_offset == [len(api_tokenizer.decode(ids[:k])) for k in range(len(ids))]
    assert text[out.text_offset[-1]:] == " fine" and out.tokens[-1] == " fine"
    assert out.top_logprobs[-1] == {" fine": -0.25, "\ufffd": -0.5}
    chat = LogprobFormatter(api_tokenizer).chat(ids, entries)
    assert b"".join(bytes(t.bytes) for t in chat.content).decode() == text


def test_an_echoed_prompts_offsets_count_its_special_tokens_text(api_tokenizer):
    from server.api.logprobs import LogprobFormatter
    from server.outputs import TokenLogprob
    text = "<|im_start|>user\nHi there<|im_end|>"
    ids = api_tokenizer.encode(text)
    entries = [None] + [TokenLogprob(-1.0)] * (len(ids) - 1)
    out = LogprobFormatter(api_tokenizer).completion(ids, entries, special_text=True)
    assert out.tokens[0] == "<|im_start|>" and out.text_offset[1] == len("<|im_start|>")
    assert [text[o:o + len(t)] for o, t in zip(out.text_offset, out.tokens)] == out.tokens
    assert out.token_logprobs[0] is None and out.top_logprobs[1] == {out.tokens[1]: -1.0}
