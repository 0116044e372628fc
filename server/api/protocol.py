"""OpenAI-compatible request and response bodies (pydantic; they stop at the HTTP edge)."""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from server.sampling_params import MAX_LOGPROBS, MAX_REPETITION_PENALTY, TYPICAL_DELTA, TYPICAL_EPSILON, SamplingParams

MAX_N = 16          # choices per request
MAX_STOP = 8        # stop strings per request
MAX_COMPLETION_LOGPROBS = 5   # the completions API's limit on `logprobs` (chat's `top_logprobs`: 20)


class APIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as most OpenAI servers do


class StreamOptions(APIModel):
    include_usage: bool = False


class JsonSchemaFormat(APIModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")   # `schema` is a BaseModel method
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(APIModel):
    """The sampling fields shared by completions and chat (Gorgon's extensions last)."""
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None   # token id (as a string) -> bias
    # extensions
    top_k: int | None = None                 # 0 or -1: off
    repetition_penalty: Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY)] | None = None   # 1: off
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    acceptance: Literal["typical", "rejection"] = "typical"
    typical_epsilon: Annotated[float, Field(ge=0.0, le=1.0)] = TYPICAL_EPSILON
    typical_delta: Annotated[float, Field(ge=0.0, le=1.0)] = TYPICAL_DELTA
    speculate: bool = True
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # prefix cache: share only within a salt
    response_format: ResponseFormat | None = None
    # structured outputs besides response_format (vLLM's names): a JSON schema, a regular
    # expression, one of some strings, a Lark grammar
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[int, float] | None:
        """Keys are token ids written in decimal digits, each id once ("01" and "1" collide)."""
        if bias is None:
            return None
        if not all(key.isascii() and key.isdigit() for key in bias):
            raise ValueError("logit_bias keys must be token ids (decimal digits)")
        ids = {int(key): value for key, value in bias.items()}
        if len(ids) != len(bias):
            raise ValueError("logit_bias names a token id twice")
        return ids

    def constraint(self) -> tuple[str, str, Any] | None:
        """The structured-output constraint asked for, as (param, kind, value) for
        server/structured.py's grammar_from, or None (more than one is `unsupported`)."""
        asked = self._constraints()
        return asked[0] if asked else None

    def _constraints(self) -> list[tuple[str, str, Any]]:
        asked = [(name, kind, value) for name, kind, value in (
            ("guided_json", "json_schema", self.guided_json), ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "grammar", self.guided_grammar))
            if value is not None]
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
            asked.insert(0, ("response_format", fmt.type, schema))
        return asked

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field we accept in the schema but cannot honour."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.json_schema is None):
            return "response_format", "response_format json_schema needs json_schema.schema"
        constraints = [name for name, _, _ in self._constraints()]
        if len(constraints) > 1:
            return constraints[1], f"ask for one structured output at a time, not {' and '.join(constraints)}"
        if len(self.stop_list) > MAX_STOP:
            return "stop", f"at most {MAX_STOP} stop strings are allowed"
        return None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_logprobs(self) -> int | None:
        """Alternatives per generated token to report with its log-probability; None: none."""
        return None

    @property
    def requested_prompt_logprobs(self) -> int | None:
        """The same for the prompt's tokens."""
        return None

    def sampling_params(self, max_tokens: int, index: int = 0, grammar: str | None = None) -> SamplingParams:
        """SamplingParams for choice `index` (a seeded request gets seed + index per choice);
        grammar: the constraint's, compiled (server/structured.py)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=None if self.seed is None else self.seed + index,
            stop=tuple(self.stop_list),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            acceptance=self.acceptance,
            typical_epsilon=self.typical_epsilon,
            typical_delta=self.typical_delta,
            speculate=self.speculate,
            cache_salt=self.cache_salt,
            logprobs=self.requested_logprobs,
            prompt_logprobs=self.requested_prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
            min_tokens=self.min_tokens,
            grammar=grammar,
        )


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16   # 0: score the prompt (with echo and logprobs)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: int | None = None

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def requested_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and self.requested_prompt_logprobs is None:
            return "max_tokens", "max_tokens 0 only scores a prompt: it needs echo and logprobs"
        if self.requested_prompt_logprobs is not None and self.stream:
            return "stream", "the prompt's logprobs (echo with logprobs) are not streamed: ask without stream"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by this server (use n)"
        return super().unsupported()


class TextPart(APIModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(APIModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON schema; none: no arguments
    strict: bool | None = None


class ChatTool(APIModel):
    type: Literal["function"]
    function: FunctionDefinition

    @property
    def parameters(self) -> dict[str, Any]:
        """Its arguments' schema; without one the function takes no arguments (OpenAI's rule)."""
        if self.function.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.function.parameters


class FunctionName(APIModel):
    name: str


class NamedToolChoice(APIModel):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(APIModel):
    name: str
    arguments: str   # JSON text, as the model wrote it


class ToolCall(APIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None            # a tool's result: the call it answers

    @property
    def text(self) -> str:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None   # None: true

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named" (server/api/tools.py)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named"
        if choice == "required":
            return choice
        return "auto" if self.tools and choice != "none" else "none"

    @property
    def parallel(self) -> bool:
        """Whether one answer may make several calls."""
        return self.parallel_tool_calls is not False

    @property
    def called_tools(self) -> list[ChatTool]:
        """The tools the model may call: all, the named one, or none."""
        mode = self.tool_mode
        if mode == "none":
            return []
        if mode == "named":
            return [t for t in self.tools or () if t.function.name == self.tool_choice.function.name]
        return list(self.tools or ())

    def _constraints(self) -> list[tuple[str, str, Any]]:
        asked = super()._constraints()
        mode = self.tool_mode
        if mode == "named" and self.called_tools:   # the output is the function's arguments
            asked.insert(0, ("tool_choice", "json_schema", self.called_tools[0].parameters))
        elif mode == "required" and self.tools:   # the output is a list of calls
            # each function's schema keeps its own root for its "#/$defs/..." references (its $id)
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"const": t.function.name},
                                                  "arguments": {"$id": f"urn:gorgon:tool:{t.function.name}",
                                                                **t.parameters}},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]}}
            if not self.parallel:
                calls["maxItems"] = 1
            asked.insert(0, ("tool_choice", "json_schema", calls))
        return asked

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            return "tools", "tools name a function twice"
        ids = [t.function.parameters["$id"] for t in self.tools or () if "$id" in (t.function.parameters or {})]
        if len(set(map(str, ids))) < len(ids):   # one would resolve its references in the other
            return "tools", "two functions' parameter schemas share one $id"
        if self.tool_mode in ("required", "named") and not self.tools:
            return "tool_choice", f"tool_choice {self.tool_mode!r} needs tools"
        if self.tool_mode == "named" and not self.called_tools:
            return "tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools"
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ----------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0   # found in the prefix cache: their keys and values were not computed again


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    """The completions API's (legacy) shape: a list per field, one entry per token."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)   # None: a prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler) -> dict[str, Any]:
        out = handler(self)
        if self.tool_calls is None:
            out.pop("tool_calls", None)
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed call: its first delta carries the id, type and name, later ones more arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _without_nones(self, handler) -> dict[str, Any]:
        out = {k: v for k, v in handler(self).items() if v is not None}
        out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return out


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_nones(self, handler) -> dict[str, Any]:
        # A chunk's delta carries only what changed: {"role": ...} first, then {"content": ...}
        # or {"tool_calls": [...]}, then {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class TokenizeRequest(APIModel):
    """vLLM's /tokenize: a prompt as completions encode it, or messages as chat renders them."""
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(APIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "gorgon"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
