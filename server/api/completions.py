"""POST /v1/completions: prompts as text or token ids, streamed or not."""
from __future__ import annotations

from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.errors import bad_request
from server.api.logprobs import LogprobFormatter
from server.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt
from server.api.serving import (ENGINE_ERRORS, Batch, Serving, collect, first_output, new_request_id, record,
                                to_api_error)
from server.api.streams import SSE_DONE, SSEResponse, prepend, sse
from server.outputs import RequestOutput

MAX_CHOICES = 64  # prompts x n


def tokenize_prompts(prompt: Prompt, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (text is what `echo` returns)."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    elif all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(tokenizer.encode(item))
            texts.append(item)
        else:
            bad = [t for t in item if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise bad_request(f"token ids must be in [0, {tokenizer.vocab_size}), got {bad[:5]}", param="prompt")
            ids.append(list(item))
            texts.append(tokenizer.decode(list(item), skip_special_tokens=False))
    return ids, texts


async def create_completion(body: CompletionRequest, request: Request, serving: Serving) -> Response:
    model = serving.check_model(body)
    prompts, prompt_texts = tokenize_prompts(body.prompt, serving.llm.tokenizer)
    if len(prompts) * body.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    for ids in prompts:
        serving.check_context(len(ids), max_tokens, least=0 if body.requested_prompt_logprobs is not None else 1)
    params = await serving.params(body, max_tokens)
    batch = Batch(new_request_id("cmpl"), prompts, body.n)
    record(request, batch)
    echo = [prompt_texts[c.prompt_index] if body.echo else "" for c in batch.choices]

    formatter = LogprobFormatter(serving.llm.tokenizer) if body.requested_logprobs is not None else None

    outputs = serving.submit(batch, params)
    if body.stream:
        first = await first_output(request, outputs)
        events = completion_events(first, outputs, batch, model, echo, body.include_usage, request, formatter)
        return SSEResponse(events, headers={"X-Request-Id": batch.request_id})

    await collect(request, batch, outputs)
    response = CompletionResponse(
        id=batch.request_id, model=model,
        choices=[CompletionChoice(index=i, text=echo[i] + c.text, finish_reason=c.finish_reason,
                                  logprobs=choice_logprobs(formatter, c, prompts[c.prompt_index], echo[i] if body.echo
                                                           else None))
                 for i, c in enumerate(batch.choices)],
        usage=batch.usage)
    return JSONResponse(response.model_dump(), headers={"X-Request-Id": batch.request_id})


def choice_logprobs(formatter: LogprobFormatter | None, choice, prompt_ids: list[int],
                    echo: str | None) -> CompletionLogprobs | None:
    """A finished choice's logprobs: its prompt's first when it is echoed (echo: the text
    echoed, None when not), then its tokens'."""
    if formatter is None:
        return None
    generated = formatter.completion(choice.token_ids, choice.logprobs)
    if echo is None or choice.prompt_logprobs is None:
        return generated
    out = formatter.completion(prompt_ids, list(choice.prompt_logprobs), special_text=True)
    out.tokens += generated.tokens
    out.token_logprobs += generated.token_logprobs
    out.top_logprobs += generated.top_logprobs
    out.text_offset += [len(echo) + offset for offset in generated.text_offset]
    return out


async def completion_events(first: tuple[int, RequestOutput], rest: AsyncIterator[tuple[int, RequestOutput]],
                            batch: Batch, model: str, echo: list[str], include_usage: bool,
                            request: Request, formatter: LogprobFormatter | None = None) -> AsyncIterator[str]:
    """SSE: text chunks (the last one of a choice carries finish_reason), usage, [DONE].
    With logprobs, a chunk carries those of the tokens since the last one (never beside
    echo: the protocol refuses both)."""
    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: bool = False) -> str:
        entries = formatter.completion(*batch.choices[index].unsent_logprobs()) if formatter and logprobs else None
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=entries)
        return sse(CompletionResponse(id=batch.request_id, model=model, choices=[choice]))

    try:
        for i, prefix in enumerate(echo):
            if prefix:
                yield chunk(i, prefix)
        async for i, out in prepend(first, rest):
            batch.choices[i].add(out)
            record(request, batch)
            failure = batch.failure()
            if failure is not None:
                yield sse(failure.body())
                break
            if out.text or out.is_finished:
                yield chunk(i, out.text, out.finish_reason, logprobs=True)
        else:
            if include_usage:
                usage = batch.usage
                yield sse(CompletionResponse(id=batch.request_id, model=model, choices=[], usage=usage))
        yield SSE_DONE
    except ENGINE_ERRORS as e:  # an admission error of a later choice
        yield sse(to_api_error(e).body())
        yield SSE_DONE
    finally:
        await rest.aclose()
