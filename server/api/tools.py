"""Tool (function) calling on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and
`parallel_tool_calls`.

- **What the model sees.** A chat template that renders `tools` (Qwen2.5's, Hermes',
  Llama 3.1's...) gets them, and the conversation's earlier calls and results in Hugging
  Face's message format. A template without (SmolLM2's) gets a system message instead: the
  functions' schemas and how to call one, in the format below; earlier calls are written
  into their assistant turns in that format. With tool_choice "none" the model sees no tools.
- **How a call is written.** `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (Hermes' format, which Qwen2.5 and many other models are trained to write).
- **"auto"** (the default with tools): the model decides; its text is parsed for calls
  afterwards: the JSON after each `<tool_call>`, or an answer that is one bare call or a
  JSON list of them, of the request's own functions with object arguments. A stream sends text until a call may begin
  (a `<tool_call>` or a piece of one at the end) and the calls when the answer is done: the
  same content and calls as the whole answer's.
- **"required" and a named function**: the output is constrained by a JSON-schema grammar
  (server/structured.py; built in protocol.ChatCompletionRequest._constraints): a named
  function's arguments, or a list of `{"name", "arguments"}` calls. The calls then always
  parse and follow their functions' parameter schemas. A named call's arguments stream as
  they are written.

A message that carries calls finishes with "tool_calls" (or "length" when cut short).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from server.api.protocol import (ChatCompletionRequest, ChatMessage, ChatTool, DeltaFunction, DeltaMessage, DeltaToolCall,
                                 FunctionCall, ToolCall)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(text: str) -> Any:
    """A call's arguments as the template expects them: a JSON object where they are one."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):   # (JSON nested past Python's recursion limit)
        return text
    return value if isinstance(value, dict) else text


def _written_call(call: ToolCall) -> str:
    body = {"name": call.function.name, "arguments": _arguments(call.function.arguments)}
    return f"{CALL_OPEN}{json.dumps(body, ensure_ascii=False)}{CALL_CLOSE}"


def tools_prompt(tools: list[ChatTool]) -> str:
    """The system message that tells a model whose template cannot show tools what it may call."""
    schemas = "\n".join(json.dumps({**t.function.model_dump(exclude_none=True), "parameters": t.parameters},
                                   ensure_ascii=False) for t in tools)
    return ("You may call functions to help with the user's request. The functions, as JSON schemas:\n"
            f"{schemas}\n"
            f'To call a function, reply with {CALL_OPEN}{{"name": <the function\'s name>, "arguments": '
            f"<its arguments as a JSON object>}}{CALL_CLOSE}, one such line per call. Each call's result "
            "comes back in a message from the tool.")


def template_messages(body: ChatCompletionRequest, renders_tools: bool) -> tuple[list[dict[str, Any]], list | None]:
    """The conversation as the chat template takes it, and the tools to pass the template
    (None: none, or written into a system message because the template cannot show them)."""
    tools = body.called_tools   # (the named function alone; none for "none")
    messages = [_template_message(m, renders_tools) for m in body.messages]
    if not tools:
        return messages, None
    if renders_tools:   # (a function without parameters takes an empty object: templates read its properties)
        return messages, [{"type": "function", "function": {**t.function.model_dump(exclude_none=True),
                                                             "parameters": t.parameters}} for t in tools]
    prompt = tools_prompt(tools)
    if messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _template_message(message: ChatMessage, renders_tools: bool) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text}
    if message.tool_calls:
        if renders_tools:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in message.tool_calls]
        else:
            out["content"] = "\n".join([message.text] * bool(message.text) + [_written_call(c) for c in message.tool_calls])
    if role == "tool":   # the call it answers (templates may print either)
        out.update({k: v for k, v in (("tool_call_id", message.tool_call_id), ("name", message.name)) if v})
    return out


def parse_calls(body: ChatCompletionRequest, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished answer -> (its content, the calls it makes); content None when the answer
    is only calls. Text that holds no well-formed call of a known function is all content."""
    mode = body.tool_mode
    if mode == "none":
        return text, []
    if mode == "named":   # the constrained output is the arguments
        return None, [ToolCall(id=new_call_id(), function=FunctionCall(name=body.called_tools[0].function.name,
                                                                        arguments=text.strip()))]
    known = {t.function.name for t in body.called_tools}
    if mode == "required":   # a constrained list of calls
        calls = _bare_calls(text, known)   # (not a list when cut short by max_tokens)
        return (None, calls) if calls else (text, [])
    pieces, calls = _split(text, known)
    if not calls:   # a model that answers with bare calls (Llama 3.1's format, Mistral's after [TOOL_CALLS])
        calls = _bare_calls(text, known)
        return (None, calls if body.parallel else calls[:1]) if calls else (text, [])
    return _joined(pieces), calls if body.parallel else calls[:1]


def _split(text: str, known: set[str]) -> tuple[list[str], list[ToolCall]]:
    """Text with `<tool_call>`s -> (the text around the calls, the calls): the pieces before,
    between and after them, whitespace next to a call dropped (so the first piece is the text
    before the first call, right-stripped)."""
    pieces, calls, last = [], [], 0
    for start, end, call in _written_calls(text, known):
        pieces.append(text[last:start].strip() if calls else text[last:start].rstrip())
        calls.append(call)
        last = end
    pieces.append(text[last:].lstrip() if calls else text)
    return pieces, calls


def _joined(pieces: list[str]) -> str | None:
    """The content of an answer with calls: its text pieces, a line apart."""
    return "\n".join(p for p in pieces if p) or None


def _written_calls(text: str, known: set[str]):
    """(start, end, call) of each well-formed `<tool_call>{...}</tool_call>` of a known
    function in text (the closing tag may be missing at the end); the JSON is read as JSON,
    so a `</tool_call>` inside a string argument does not end it."""
    decoder, at = json.JSONDecoder(), 0
    while (start := text.find(CALL_OPEN, at)) >= 0:
        body = start + len(CALL_OPEN)
        body += len(text[body:]) - len(text[body:].lstrip())
        try:
            written, end = decoder.raw_decode(text, body)
        except (json.JSONDecodeError, RecursionError):
            at = body
            continue
        call = _call(written, known)
        if call is None:
            at = end
            continue
        rest = text[end:].lstrip()
        end = len(text) - len(rest) + (len(CALL_CLOSE) if rest.startswith(CALL_CLOSE) else 0)
        yield start, end, call
        at = end


def _bare_calls(text: str, known: set[str]) -> list[ToolCall]:
    """An answer that is one call as JSON, or a JSON list of them -> the calls; none unless
    every one is a well-formed call of a known function."""
    try:
        written = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return []
    calls = [_call(c, known) for c in (written if isinstance(written, list) else [written])]
    return calls if calls and None not in calls else []


def _call(written: Any, known: set[str]) -> ToolCall | None:
    """A call as written ({"name", "arguments" or "parameters"}) -> a ToolCall, or None when it
    names no known function or its arguments are not a JSON object."""
    if not isinstance(written, dict) or not isinstance(written.get("name"), str) or written["name"] not in known:
        return None
    arguments = written.get("arguments", written.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _arguments(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=written["name"],
                                                            arguments=json.dumps(arguments, ensure_ascii=False)))


def finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    """A message that makes calls finishes with "tool_calls", unless cut short."""
    return "tool_calls" if calls and reason == "stop" else reason


class HeldText:
    """Streaming under tool_choice "auto": passes text on until a call may begin, then holds
    the rest for parse_calls at the end (an answer that opens with "{" or "[" may be bare
    calls: all of it). Trailing whitespace waits for what follows it, so that the content streamed is
    the content parse_calls gives the whole answer."""

    def __init__(self):
        self.text = ""
        self.sent = 0   # text[:sent] went out as content
        self.holding = False

    def add(self, delta: str) -> str:
        """The next text -> the part that can go out as content now."""
        self.text += delta
        if not self.sent and self.text.lstrip()[:1] in ("{", "["):   # the whole answer may be bare calls
            self.holding = True
        if self.holding:
            return ""
        start = self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            self.holding = True
            end = start
        else:   # keep back an end that may be the start of a call
            end = len(self.text) - next((n for n in range(len(CALL_OPEN) - 1, 0, -1)
                                         if self.text.endswith(CALL_OPEN[:n])), 0)
        # and the whitespace before it: parse_calls drops whitespace next to a call
        end = max(len(self.text[:end].rstrip()), self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def rest(self) -> str:
        """What was held back (at the end of the answer)."""
        return self.text[self.sent:]


class ChoiceStream:
    """One streamed choice's deltas under its request's tool mode: content as it comes
    ("none"), a named call's arguments as they are written, or ("auto", "required") content
    up to where calls may begin and the calls at the end."""

    def __init__(self, body: ChatCompletionRequest):
        self.body = body
        self.mode = body.tool_mode
        self.held = HeldText()
        self.held.holding = self.mode == "required"   # all of it is calls: nothing streams before the end
        self.named_id: str | None = None
        self.made_calls = False

    def opening(self) -> DeltaMessage:
        """The role's delta: content "" where the answer may be text, none where it is calls."""
        return DeltaMessage(role="assistant", content=None if self.mode in ("named", "required") else "")

    def add(self, text: str) -> DeltaMessage | None:
        if self.mode == "none":
            return DeltaMessage(content=text) if text else None
        if self.mode == "named":
            return self._named(text) if text or self.named_id is None else None
        out = self.held.add(text)
        return DeltaMessage(content=out) if out else None

    def _named(self, arguments: str) -> DeltaMessage:
        if self.named_id is None:   # the call's first delta: its id and name
            self.named_id, self.made_calls = new_call_id(), True
            name = self.body.called_tools[0].function.name
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=self.named_id, type="function",
                                                          function=DeltaFunction(name=name, arguments=arguments))])
        return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunction(arguments=arguments))])

    def finish(self) -> DeltaMessage | None:
        """What was held back, at the end of the answer: content and the calls it makes."""
        if self.mode == "none" or (self.mode == "named" and self.named_id is not None):
            return None
        if self.mode == "named":   # no text came at all
            return self._named("")
        rest = self.held.rest()
        if self.mode == "required":
            content, calls = parse_calls(self.body, rest)
        else:   # the content parse_calls gives the whole answer, less what went out already
            sent = self.held.text[:self.held.sent]
            pieces, calls = _split(rest, {t.function.name for t in self.body.called_tools})
            if calls:
                content = (_joined([sent + pieces[0], *pieces[1:]]) or "")[len(sent):] or None
                calls = calls if self.body.parallel else calls[:1]
            else:   # a bare call is a whole answer; else all of it is content
                content, calls = parse_calls(self.body, rest) if not sent else (rest, [])
        if not calls:
            return DeltaMessage(content=content) if content else None
        self.made_calls = True
        return DeltaMessage(content=content, tool_calls=[
            DeltaToolCall(index=k, id=c.id, type="function",
                          function=DeltaFunction(name=c.function.name, arguments=c.function.arguments))
            for k, c in enumerate(calls)])

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.made_calls and reason == "stop" else reason
