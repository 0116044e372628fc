"""What completions and chat share: admission checks, submitting choices, collecting them.

HTTP request -> (prompt token ids, SamplingParams) per choice -> AsyncEngine streams, merged.
"""
from __future__ import annotations

import asyncio
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request

from server.api.errors import APIError, bad_request
from server.api.protocol import SamplingRequest, UsageInfo
from server.api.streams import merge, until_disconnect
from server.async_engine import AsyncEngine, EngineNotReadyError, QueueFullError
from server.outputs import RequestOutput, TokenLogprob
from server.sampling_params import SamplingParams
from server.structured import grammar_from

RETRY_AFTER_S = "1"


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Choice:
    """One choice as it accumulates: text, finish reason, token counts."""
    prompt_index: int
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)          # with logprobs: the tokens they are of
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0   # streaming: how many of them went out
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.logprobs is not None:
            self.token_ids += out.token_ids[:len(out.logprobs)]
            self.logprobs += out.logprobs
        self.num_prompt_tokens = max(self.num_prompt_tokens, out.num_prompt_tokens)  # an abort output carries 0
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.is_finished:
            self.finish_reason = out.finish_reason
            self.error = out.error

    def unsent_logprobs(self) -> tuple[list[int], list[TokenLogprob], int]:
        """Streaming: the token ids and logprobs so far and the index of the first one not
        sent yet (all now marked sent)."""
        start, self.logprobs_sent = self.logprobs_sent, len(self.logprobs)
        return self.token_ids, self.logprobs, start


@dataclass
class Batch:
    """A request's choices: prompt p, sample j is choice p * n + j (OpenAI's order)."""
    request_id: str
    prompts: list[list[int]]
    n: int
    choices: list[Choice] = field(init=False)

    def __post_init__(self):
        self.choices = [Choice(p) for p in range(len(self.prompts)) for _ in range(self.n)]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)  # each prompt counts once, whatever n

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache, each prompt once (for n > 1: the fewest
        any of its choices found)."""
        return sum(min(c.num_cached_tokens for c in self.choices[p * self.n:(p + 1) * self.n])
                   for p in range(len(self.prompts)))

    @property
    def usage(self) -> UsageInfo:
        return UsageInfo.of(self.num_prompt_tokens, self.num_completion_tokens, self.num_cached_tokens)

    def failure(self) -> APIError | None:
        """An error for a finished batch whose choice failed or was aborted."""
        for c in self.choices:
            if c.finish_reason == "error":
                return APIError(500, f"generation failed: {c.error or 'engine error'}")
            if c.finish_reason == "abort":
                return APIError(503, "the request was aborted (the server is shutting down)")
        return None


class Serving:
    """Turns validated OpenAI requests into engine requests."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    @property
    def llm(self):
        if not self.engine.is_ready:
            raise APIError(503, "the model is not ready (loading or shutting down)",
                           headers={"Retry-After": RETRY_AFTER_S})
        return self.engine.engine

    def served_model(self, asked: str | None) -> str:
        """The served model's name; 404 for any other model."""
        name = self.llm.model_name
        if asked is not None and asked != name:
            raise APIError(404, f"The model `{asked}` does not exist; this server serves `{name}`.",
                           param="model", code="model_not_found")
        return name

    def check_model(self, body: SamplingRequest) -> str:
        """The served model's name (404 for any other model); 400 for what it cannot honour."""
        name = self.served_model(body.model)
        unsupported = body.unsupported()
        if unsupported is not None:
            param, message = unsupported
            raise bad_request(message, param=param, code="unsupported_parameter")
        vocab = self.llm.tokenizer.vocab_size   # as prompt token ids are checked
        for param, ids in (("logit_bias", body.logit_bias or ()), ("stop_token_ids", body.stop_token_ids or ())):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"{param} token ids must be in [0, {vocab}), got {bad[:5]}", param=param)
        return name

    def check_context(self, prompt_len: int, max_tokens: int | None, prompt_param: str = "prompt",
                      least: int = 1) -> int:
        """max_tokens to use; 400 with the numbers when prompt + completion exceed the context.
        least: the fewest tokens a completion may ask for (0: a prompt to score)."""
        limit = self.llm.max_model_len
        if prompt_len == 0:
            raise bad_request("the prompt must not be empty", param=prompt_param)
        if max_tokens is None:
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit or max_tokens < least:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, "
                f"{max(max_tokens, 1)} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if prompt_len < limit else prompt_param, code="context_length_exceeded")
        return max_tokens

    async def params(self, body: SamplingRequest, max_tokens: int) -> list[SamplingParams]:
        if body.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
                              param="min_tokens")
        grammar = await asyncio.to_thread(self.grammar, body)   # a large one takes a while to compile
        try:
            return [body.sampling_params(max_tokens, j, grammar) for j in range(body.n)]
        except ValueError as e:
            raise bad_request(str(e)) from e

    def grammar(self, body: SamplingRequest) -> str | None:
        """The structured-output constraint's grammar, compiled (and kept for the engine:
        server/structured.py); 400 naming the field when it is malformed or does not compile."""
        constraint = body.constraint()
        if constraint is None:
            return None
        param, kind, value = constraint
        try:
            grammar = grammar_from(kind, value)
        except ValueError as e:
            raise bad_request(f"{param}: {e}", param=param) from e
        error = self.llm.structured.check(grammar)
        if error is not None:
            raise bad_request(f"{param}: {error}", param=param)
        return grammar

    def submit(self, batch: Batch, params: list[SamplingParams]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Start every choice; yields (choice index, output). Admission errors surface on first await."""
        count = len(batch.choices)
        if self.engine.num_waiting + count > self.engine.config.max_queue_size:
            raise queue_full(self.engine.config.max_queue_size)
        streams = [self.engine.generate(f"{batch.request_id}-{i}", batch.prompts[c.prompt_index], params[i % batch.n])
                   for i, c in enumerate(batch.choices)]
        return merge(streams)


def queue_full(size: int) -> APIError:
    return APIError(503, f"The server is overloaded ({size} requests waiting); retry later.",
                    code="queue_full", headers={"Retry-After": RETRY_AFTER_S})


def to_api_error(exc: Exception) -> APIError:
    """The HTTP error for an engine refusal (queue full, not ready, invalid request)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


ENGINE_ERRORS = (APIError, QueueFullError, EngineNotReadyError, ValueError)


@contextmanager
def engine_errors():
    """Map the engine's refusals to HTTP errors."""
    try:
        yield
    except ENGINE_ERRORS as e:
        raise to_api_error(e) from e


def record(request: Request, batch: Batch) -> None:
    """What the access log prints for this request."""
    request.state.request_id = batch.request_id
    request.state.prompt_tokens = batch.num_prompt_tokens
    request.state.completion_tokens = batch.num_completion_tokens
    reasons = sorted({c.finish_reason for c in batch.choices if c.finish_reason})
    request.state.finish_reason = ",".join(reasons) or None


async def first_output(request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]]):
    """The first output of a streamed batch; an engine error before it becomes an HTTP error."""
    with engine_errors():
        return await until_disconnect(request, anext(outputs))


async def collect(request: Request, batch: Batch, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> None:
    """Run a non-streamed batch to its end; raise its failure as an HTTP error, if any."""
    async def drain():
        async for i, out in outputs:
            batch.choices[i].add(out)

    with engine_errors():
        await until_disconnect(request, drain())
    record(request, batch)
    failure = batch.failure()
    if failure is not None:
        raise failure
