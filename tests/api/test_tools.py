"""Tool calling's pieces (server/api/tools.py): the prompt, parsing calls, streaming them."""
from __future__ import annotations

import json

import pytest

from server.api.protocol import ChatCompletionRequest
from server.api.tools import CALL_OPEN, ChoiceStream, HeldText, parse_calls, template_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                 tools=[WEATHER, TIME], **kwargs)


def test_auto_calls_are_parsed_and_the_rest_is_content():
    text = ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = parse_calls(request(), text)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    content, calls = parse_calls(request(parallel_tool_calls=False), text)
    assert [c.function.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize("text", [
    "Paris is sunny.",
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',   # no name
    '<tool_call>["get_time"]</tool_call>',
])
def test_auto_text_without_a_well_formed_call_is_all_content(text):
    assert parse_calls(request(), text) == (text, [])


def test_an_unclosed_call_at_the_end_still_counts():
    content, calls = parse_calls(request(), '<tool_call>{"name": "get_time", "arguments": "{}"}')
    assert content is None and calls[0].function.arguments == "{}"


def test_forced_calls_parse_from_the_constrained_output():
    named = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, calls = parse_calls(named, '{"city": "Paris"}')
    assert content is None and calls[0].function.name == "get_weather" and calls[0].function.arguments == '{"city": "Paris"}'
    content, calls = parse_calls(request(tool_choice="required"),
                                 '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    assert [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert parse_calls(request(tool_choice="required"), '[{"name": "get_ti') == ('[{"name": "get_ti', [])   # cut short
    assert parse_calls(request(tool_choice="none"), f"{CALL_OPEN}...") == (f"{CALL_OPEN}...", [])


def test_forced_choices_constrain_the_output_with_a_schema():
    named = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.constraint() == ("tool_choice", "json_schema", WEATHER["function"]["parameters"])
    param, kind, schema = request(tool_choice="required", parallel_tool_calls=False).constraint()
    assert (param, kind, schema["minItems"], schema["maxItems"]) == ("tool_choice", "json_schema", 1, 1)
    names = [option["properties"]["name"]["const"] for option in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert request().constraint() is None and request(tool_choice="none").constraint() is None


def test_held_text_streams_everything_before_a_call():
    held, sent = HeldText(), []
    for piece in ["Sure", ". <", "tool", "_ca", "ll>{\"name\"", ": 1}</tool_call>"]:
        sent.append(held.add(piece))
    assert "".join(sent) == "Sure." and held.rest() == ' <tool_call>{"name": 1}</tool_call>'
    held = HeldText()   # a "<" that starts no call goes out once it is clear; whitespace waits for what follows
    assert [held.add(p) for p in ["a <", "b", " <tool"]] == ["a", " <b", ""]
    assert held.rest() == " <tool"


TEXTS = [
    'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nDone.',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "</tool_call>"}}\n</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": {}}\n<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}',
    'A <tool_call>{"name": "nope", "arguments": {}}</tool_call> B <tool_call>{"name": "get_time"}</tool_call>  ',
    "  Just text, < tool_call > and <tool_call> without JSON.\n",
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    'First. <tool_call>{"name": "get_time"}</tool_call> Then. <tool_call>{"name": "get_time"}</tool_call> Done.',
    'Hi <tool_call>{"name": "nope"}</tool_call> <tool_call>{"name": "get_time"}</tool_call> {"name": "get_time"}',
    '{"name": {"first": "Ann"}, "arguments": {}} <tool_call>{"name": ["get_time"]}</tool_call>',
    '<tool_call>' + '[' * 5000,
    '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]',
    '[Rome](https://rome.example) is sunny.',
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_answers_equal_whole_ones_however_split(text):
    import random
    rng = random.Random(0)
    body = request()
    content, calls = parse_calls(body, text)
    whole = (content, [(c.function.name, c.function.arguments) for c in calls])
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(8, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        deltas, _ = stream(body, pieces)
        streamed = "".join(d.get("content") or "" for d in deltas) or None
        made = [(c["function"]["name"], c["function"]["arguments"]) for d in deltas for c in d.get("tool_calls", ())]
        assert (streamed, made) == whole, pieces


def test_only_known_functions_with_object_arguments_are_calls():
    content, calls = parse_calls(request(), TEXTS[3])
    assert [c.function.name for c in calls] == ["get_time"] and calls[0].function.arguments == "{}"
    assert content == 'A <tool_call>{"name": "nope", "arguments": {}}</tool_call> B'
    for arguments in ('"Paris"', "null", "[1]", '"not json"'):
        text = f'<tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call>'
        assert parse_calls(request(), text) == (text, [])
    no_tools = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tool_choice="auto")
    assert no_tools.tool_mode == "none" and parse_calls(no_tools, TEXTS[0]) == (TEXTS[0], [])


def test_a_string_argument_may_hold_the_closing_tag_and_a_bare_call_counts():
    content, calls = parse_calls(request(), TEXTS[1])
    assert content is None and json.loads(calls[0].function.arguments) == {"city": "</tool_call>"}
    content, calls = parse_calls(request(), TEXTS[2])   # the first call's closing tag is missing
    assert content is None and [c.function.name for c in calls] == ["get_time", "get_weather"]
    content, calls = parse_calls(request(), TEXTS[5])
    assert content is None and json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    content, calls = parse_calls(request(), TEXTS[10])   # a list of bare calls (Mistral's, its tag decoded away)
    assert content is None and [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert parse_calls(request(), TEXTS[11]) == (TEXTS[11], [])


def test_text_between_calls_is_kept_a_line_apart_and_odd_json_is_content():
    assert parse_calls(request(), TEXTS[6])[0] == "First.\nThen.\nDone."
    for text in TEXTS[8:10]:   # a name that is no string, JSON nested past Python's recursion limit
        assert parse_calls(request(), text) == (text, [])
    deep = ChatCompletionRequest(tools=[WEATHER], messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[" * 5000}}]}])
    assert template_messages(deep, renders_tools=True)[0][0]["tool_calls"][0]["function"]["arguments"] == "[" * 5000


def test_two_schemas_with_one_id_are_refused():
    tools = [{"type": "function", "function": {"name": n, "parameters": {"$id": "urn:x", "type": "object"}}}
             for n in ("a", "b")]
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=tools)
    assert body.unsupported() == ("tools", "two functions' parameter schemas share one $id")


def test_parallel_tool_calls_null_means_true():
    assert request(parallel_tool_calls=None).parallel and not request(parallel_tool_calls=False).parallel


def test_required_keeps_each_functions_own_references(api_tokenizer):
    from server.structured import StructuredOutputs, grammar_from
    nested = {"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Place"}}, "required": ["to"]}}}
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=[nested, TIME],
                                 tool_choice="required")
    structured = StructuredOutputs(api_tokenizer, api_tokenizer.vocab_size)
    assert structured.check(grammar_from(*body.constraint()[1:])) is None


def stream(body: ChatCompletionRequest, pieces: list[str], reason: str = "stop") -> tuple[list[dict], str]:
    s = ChoiceStream(body)
    deltas = [s.add(p) for p in pieces] + [s.finish()]
    return [d.model_dump() for d in deltas if d is not None], s.finish_reason(reason)


def test_a_named_call_streams_its_arguments_as_written():
    body = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas, reason = stream(body, ['{"city"', ': "Paris"}'])
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert deltas[1] == {"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}
    assert len(deltas) == 2 and reason == "tool_calls"
    assert stream(body, ['{"ci'], "length")[1] == "length"


def test_auto_streams_content_then_the_calls_at_the_end():
    deltas, reason = stream(request(), ["Checking. ", '<tool_call>{"name": "get_time", ', '"arguments": {}}</tool_call>'])
    assert deltas[0] == {"content": "Checking."}
    calls = deltas[1]["tool_calls"]
    assert len(deltas) == 2 and "content" not in deltas[1] and reason == "tool_calls"
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [(0, "get_time", "{}")]
    deltas, reason = stream(request(), ["No calls, ", "just <tool"])   # held back, then sent as content
    assert [d["content"] for d in deltas] == ["No calls,", " just", " <tool"] and reason == "stop"
    deltas, reason = stream(request(tool_choice="none"), ["<tool_call>{}"])
    assert deltas == [{"content": "<tool_call>{}"}] and reason == "stop"


def conversation() -> ChatCompletionRequest:
    return ChatCompletionRequest(tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}])


def test_a_template_without_tools_gets_them_in_the_system_message(api_tokenizer):
    assert not api_tokenizer.renders_tools   # SmolLM2's template
    messages, tools = template_messages(conversation(), renders_tools=False)
    assert tools is None and messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in messages[0]["content"] and CALL_OPEN in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text = api_tokenizer.decode(api_tokenizer.apply_chat_template(messages), skip_special_tokens=False)
    assert "<|im_start|>tool\n18 C, sunny<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    bare, _ = template_messages(ChatCompletionRequest(tools=[WEATHER], tool_choice="none",
                                                      messages=[{"role": "user", "content": "Hi"}]), False)
    assert bare == [{"role": "user", "content": "Hi"}]   # "none": the model sees no tools


def test_a_template_with_tools_gets_them_and_the_calls_in_its_own_format(api_tokenizer):
    messages, tools = template_messages(conversation(), renders_tools=True)
    assert tools == [WEATHER] and messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]   # arguments as an object, as templates expect
    assert messages[3]["tool_call_id"] == "call_1"
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{{ m.content }};{% endfor %}")
    original = api_tokenizer.hf.chat_template
    api_tokenizer.hf.chat_template = template
    try:
        assert api_tokenizer.renders_tools
        text = api_tokenizer.decode(api_tokenizer.apply_chat_template(messages, tools))
        assert text == "[get_weather]Be brief.;Weather in Paris?;get_weather(Paris);18 C, sunny;"
        api_tokenizer.hf.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(ValueError, match="roles must alternate"):
            api_tokenizer.apply_chat_template(messages)
    finally:
        api_tokenizer.hf.chat_template = original


def test_a_function_without_parameters_takes_none():
    named = request(tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.constraint()[2] == {"type": "object", "properties": {}, "additionalProperties": False}
