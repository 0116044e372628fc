"""Tool calling on the real server through the official `openai` client."""
from __future__ import annotations

import json

import openai
import pytest
from live_server import API_KEY

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)


def streamed(client, **kwargs) -> tuple[str | None, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish reason) gathered from a stream's deltas."""
    content, calls, reason = None, {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        if choice.delta.content:
            content = (content or "") + choice.delta.content
        for call in choice.delta.tool_calls or ():
            name, arguments = calls.get(call.index, ("", ""))
            calls[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
            assert call.id is None or call.id.startswith("call_")
        reason = choice.finish_reason or reason
    return content, [calls[k] for k in sorted(calls)], reason


def made(reply) -> tuple[str | None, list[tuple[str, str]], str]:
    message = reply.choices[0].message
    return message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls or ()], \
        reply.choices[0].finish_reason


def test_a_named_function_is_called_with_arguments_that_follow_its_schema(client, model_name):
    kwargs = dict(model=model_name, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, calls, reason = made(client.chat.completions.create(**kwargs))
    assert content is None and reason == "tool_calls" and [name for name, _ in calls] == ["get_weather"]
    arguments = json.loads(calls[0][1])
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    assert streamed(client, **kwargs) == (None, calls, "tool_calls")


def test_required_makes_at_least_one_call(client, model_name):
    kwargs = dict(model=model_name, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
                  tool_choice="required", parallel_tool_calls=False)
    content, calls, reason = made(client.chat.completions.create(**kwargs))
    assert content is None and reason == "tool_calls" and len(calls) == 1
    name, arguments = calls[0]
    assert name in ("get_weather", "get_time") and isinstance(json.loads(arguments), dict)
    assert streamed(client, **kwargs) == (None, calls, "tool_calls")


def test_required_follows_a_schemas_own_definitions(client, model_name):
    """Pydantic writes nested models as "$defs" with "#/$defs/..." references."""
    book = {"type": "function", "function": {"name": "book_trip", "parameters": {
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"], "additionalProperties": False}},
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Place"}}, "required": ["to"],
        "additionalProperties": False}}}
    reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Book Rome."}],
                                           tools=[book], tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=60, temperature=0)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and reply.choices[0].finish_reason == "tool_calls"
    arguments = json.loads(calls[0].function.arguments)
    assert calls[0].function.name == "book_trip" and list(arguments) == ["to"] and list(arguments["to"]) == ["city"]


def test_auto_streams_what_it_answers_whole(client, model_name):
    """Whether the small model calls is its own choice; streamed or not, the answer is the same."""
    kwargs = dict(model=model_name, messages=ASK, tools=[WEATHER], max_tokens=48, temperature=0)
    whole = made(client.chat.completions.create(**kwargs))
    assert streamed(client, **kwargs) == whole
    assert whole[2] == ("tool_calls" if whole[1] else whole[2])


def test_a_conversation_with_calls_and_results_continues(client, model_name):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    reply = client.chat.completions.create(model=model_name, messages=messages, tools=[WEATHER], max_tokens=16,
                                           temperature=0)
    without = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    assert reply.usage.prompt_tokens > without.usage.prompt_tokens   # the tools' description
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls
