"""The real server through the official `openai` client: completions and chat, streamed and not."""
from __future__ import annotations

import asyncio
import json

import openai
import pytest
from live_server import API_KEY

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)


def streamed_completion(client, model_name, **kwargs) -> tuple[str, list]:
    chunks = list(client.completions.create(model=model_name, stream=True, **kwargs))
    return "".join(c.text for chunk in chunks for c in chunk.choices), chunks


def test_models(client, model_name):
    models = client.models.list().data
    assert [m.id for m in models] == [model_name] and model_name == "SmolLM2-135M-Instruct"


def test_completion_streamed_equals_plain_with_exact_usage(client, model_name, api_tokenizer):
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, **GREEDY)
    choice = plain.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert plain.usage.prompt_tokens == len(api_tokenizer.encode(PROMPT))
    assert plain.usage.completion_tokens == 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 6

    text, chunks = streamed_completion(client, model_name, prompt=PROMPT, max_tokens=6,
                                       stream_options={"include_usage": True}, **GREEDY)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_token_id_prompt_and_echo(client, model_name, api_tokenizer):
    ids = api_tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=3, echo=True, **GREEDY)
    by_text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, **GREEDY)
    assert by_ids.choices[0].text == PROMPT + by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_streamed_equals_plain_with_exact_usage(client, model_name, api_tokenizer):
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_completion_tokens=6, **GREEDY)
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    assert plain.usage.prompt_tokens == len(api_tokenizer.apply_chat_template(MESSAGES))
    assert plain.usage.completion_tokens == 6

    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # the same prompt again: every full block of it but the one holding its last token was cached
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (plain.usage.prompt_tokens - 1) // 16 * 16 > 0


def test_completion_logprobs_streamed_equal_plain(client, model_name):
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    choice = plain.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # greedy: each token is its row's likeliest, and its alternatives are less likely
        assert len(top) == 3 and logprob <= 0 and top[token] == logprob == max(top.values())
    text, chunks = streamed_completion(client, model_name, prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    parts = [c.logprobs for chunk in chunks for c in chunk.choices if c.logprobs and c.logprobs.tokens]
    assert text == choice.text
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [x for p in parts for x in p.token_logprobs] == lp.token_logprobs
    assert [x for p in parts for x in p.text_offset] == lp.text_offset


def test_a_prompt_scored_with_echo_and_max_tokens_0(client, model_name, api_tokenizer):
    """What an evaluation harness asks: the prompt's own log-probabilities, nothing generated."""
    ids = api_tokenizer.encode(PROMPT)
    scored = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    choice, lp = scored.choices[0], scored.choices[0].logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(top) <= 2 for top in lp.top_logprobs[1:])
    both = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, **GREEDY)
    full = both.choices[0].logprobs
    assert full.token_logprobs[:len(ids)] == lp.token_logprobs and len(full.tokens) == len(ids) + 3
    assert both.choices[0].text == PROMPT + "".join(full.tokens[len(ids):])
    assert full.text_offset[len(ids)] == len(PROMPT)


def test_chat_logprobs_streamed_equal_plain(client, model_name):
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, logprobs=True,
                                           top_logprobs=2, **GREEDY)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens == 8
    assert b"".join(bytes(t.bytes) for t in content).decode() == plain.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob == token.logprob
        assert token.top_logprobs[0].bytes == token.bytes and token.top_logprobs[1].logprob <= token.logprob
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, stream=True,
                                                 logprobs=True, top_logprobs=2, **GREEDY))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    without = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, **GREEDY)
    assert without.choices[0].logprobs is None


def test_stop_string_straddling_tokens_never_leaks(client, model_name, api_tokenizer):
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text
    pieces = [api_tokenizer.decode([t]) for t in api_tokenizer.encode(full)]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and pieces[i] and pieces[i - 1].strip())
    stop = pieces[i - 1][-2:] + pieces[i][:1]
    assert "".join(pieces) == full and stop in full
    expected = full[:full.index(stop)]

    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, stop=[stop, "zzz"], **GREEDY)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    text, chunks = streamed_completion(client, model_name, prompt=PROMPT, max_tokens=8, stop=stop, **GREEDY)
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logit_bias_and_penalties(client, model_name, api_tokenizer):
    forced = api_tokenizer.encode(" zebra")
    assert len(forced) == 1
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={str(forced[0]): 100})
    assert out.choices[0].text == " zebra" * 3
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=64, temperature=0)
    penalized = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=64, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain.choices[0].message.content
    longer = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=64, temperature=0,
                                            extra_body={"min_tokens": 40})
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    assert longer.usage.completion_tokens >= 40


def test_structured_outputs(client, model_name):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Give me a city and its population as JSON."}],
        max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    parsed = json.loads(reply.choices[0].message.content)
    assert set(parsed) == {"city", "population"} and isinstance(parsed["population"], int)
    assert reply.choices[0].finish_reason == "stop"
    text, chunks = streamed_completion(client, model_name, prompt="Is water wet? Answer:", max_tokens=8, temperature=0,
                                       extra_body={"guided_choice": [" yes", " no", " maybe"]})
    assert text in (" yes", " no", " maybe") and chunks[-1].choices[0].finish_reason == "stop"
    scored = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=20, extra_body={"guided_choice": ["red", "blue"]})
    assert scored.choices[0].message.content in ("red", "blue")
    assert min(alt.logprob for entry in scored.choices[0].logprobs.content for alt in entry.top_logprobs) == -9999.0


def test_n_choices_and_seed(client, model_name):
    kwargs = dict(model=model_name, prompt="Once upon a time", max_tokens=4, n=2, seed=1234, temperature=1.0,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 8

    chat = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=3, n=2, seed=7,
                                          temperature=1.0)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_sixteen_concurrent_streams_all_complete(server, model_name):
    client = openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=600)

    async def one(i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": f"Count to {i + 2}."}], max_tokens=3,
            stream=True, temperature=0)
        text, finish = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    assert len(results) == 16
    assert all(finish in ("stop", "length") for _, finish in results), results
    assert all(text for text, finish in results if finish == "length")
