"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""
from __future__ import annotations

from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.errors import bad_request
from server.api.logprobs import LogprobFormatter
from server.api.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                 ChatCompletionResponse, ChatResponseMessage, DeltaMessage)
from server.api.serving import (ENGINE_ERRORS, Batch, Serving, collect, first_output, new_request_id, record,
                                to_api_error)
from server.api.streams import SSE_DONE, SSEResponse, prepend, sse
from server.api.tools import ChoiceStream, finish_reason, parse_calls, template_messages
from server.outputs import RequestOutput


async def create_chat_completion(body: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    model = serving.check_model(body)
    tokenizer = serving.llm.tokenizer
    try:
        prompt_ids = tokenizer.apply_chat_template(*template_messages(body, tokenizer.renders_tools))
    except ValueError as e:
        raise bad_request(str(e), param="messages") from e
    max_tokens = serving.check_context(len(prompt_ids), body.requested_max_tokens, "messages")
    params = await serving.params(body, max_tokens)
    batch = Batch(new_request_id("chatcmpl"), [prompt_ids], body.n)
    record(request, batch)

    formatter = LogprobFormatter(serving.llm.tokenizer) if body.requested_logprobs is not None else None

    outputs = serving.submit(batch, params)
    if body.stream:
        first = await first_output(request, outputs)
        events = chat_events(first, outputs, batch, model, body, request, formatter)
        return SSEResponse(events, headers={"X-Request-Id": batch.request_id})

    await collect(request, batch, outputs)
    choices = []
    for i, c in enumerate(batch.choices):
        content, calls = parse_calls(body, c.text)
        choices.append(ChatChoice(index=i, message=ChatResponseMessage(content=content, tool_calls=calls or None),
                                  finish_reason=finish_reason(c.finish_reason, calls),
                                  logprobs=formatter.chat(c.token_ids, c.logprobs) if formatter else None))
    response = ChatCompletionResponse(id=batch.request_id, model=model, choices=choices, usage=batch.usage)
    return JSONResponse(response.model_dump(), headers={"X-Request-Id": batch.request_id})


async def chat_events(first: tuple[int, RequestOutput], rest: AsyncIterator[tuple[int, RequestOutput]],
                      batch: Batch, model: str, body: ChatCompletionRequest, request: Request,
                      formatter: LogprobFormatter | None = None) -> AsyncIterator[str]:
    """SSE: a role chunk per choice, content (or tool call) deltas, a finish chunk per choice,
    usage, [DONE]. With logprobs, a delta or finish chunk carries those of the tokens since the
    last one."""
    def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None, logprobs: bool = False) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                 logprobs=formatter.chat(*batch.choices[index].unsent_logprobs())
                                 if formatter and logprobs else None)
        return sse(ChatCompletionChunk(id=batch.request_id, model=model, choices=[choice]))

    streams = [ChoiceStream(body) for _ in batch.choices]
    try:
        for i, stream in enumerate(streams):
            yield chunk(i, stream.opening())
        async for i, out in prepend(first, rest):
            batch.choices[i].add(out)
            record(request, batch)
            failure = batch.failure()
            if failure is not None:
                yield sse(failure.body())
                break
            delta = streams[i].add(out.text)
            if delta is not None:
                yield chunk(i, delta, logprobs=True)
            if out.is_finished:
                delta = streams[i].finish()
                if delta is not None:
                    yield chunk(i, delta, logprobs=True)
                yield chunk(i, DeltaMessage(), streams[i].finish_reason(out.finish_reason), logprobs=True)
        else:
            if body.include_usage:
                usage = batch.usage
                yield sse(ChatCompletionChunk(id=batch.request_id, model=model, choices=[], usage=usage))
        yield SSE_DONE
    except ENGINE_ERRORS as e:  # an admission error of a later choice
        yield sse(to_api_error(e).body())
        yield SSE_DONE
    finally:
        await rest.aclose()
