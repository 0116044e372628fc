"""Locust scenarios for Gorgon (or any OpenAI-compatible server).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s
    make loadtest HOST=http://127.0.0.1:8000 USERS=16 DURATION=60s   # CSVs + HTML report

Four kinds of user, weighted like a chat product's traffic:

- ``ChatStreamUser`` (weight 3): streamed chat completions (SSE). Besides the request
  itself ("POST chat-stream", response_time = whole stream), every stream reports
  "TTFT chat-stream" (request sent -> first content token) and one "ITL chat-stream"
  sample per gap between consecutive content events, as locust metrics (request_type
  "SSE"), so that their percentiles appear in the CSVs and the HTML report.
- ``ChatUser`` (weight 2): non-streamed chat completions.
- ``ConversationUser`` (weight 2): streamed chats of GORGON_LT_TURNS turns, each request
  carrying the conversation so far (earlier questions and the server's answers), as a
  chat client sends it: what a prefix cache serves ("TTFT conversation" shows it).
- ``CompletionUser`` (weight 1): plain text completions, half of them streamed (reported
  as "TTFT completion-stream" / "ITL completion-stream").

Prompts are the project's evaluation prompts (benchmarks/eval_prompts.py: chat and code,
never training prompts) plus a few short ones. A request counts as failed on a non-200
status, a malformed SSE stream, a stream without [DONE], or an empty answer.

Settings (environment variables):
  GORGON_LT_MAX_TOKENS   max_tokens per request, default 32
  GORGON_LT_TEMPERATURE  sampling temperature, default 0.7 (0 = greedy)
  GORGON_LT_MODEL        "model" field; default: asked from /v1/models once per user
  GORGON_LT_API_KEY      sent as "Authorization: Bearer ..." when set (also OPENAI_API_KEY)
  GORGON_LT_TIMEOUT      per-request network timeout in seconds, default 300
  GORGON_LT_WAIT         "min,max" think time between requests in seconds, default "0.5,2"
  GORGON_LT_TURNS        turns per conversation (ConversationUser), default 4
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

# benchmarks/ lives at the repository root, next to loadtest/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from benchmarks.eval_prompts import CHAT, CODE
except ImportError:  # run from a copy of this file alone: a small built-in stand-in
    CHAT = ["Explain how a refrigerator keeps food cold, for a ten-year-old.",
            "What are the pros and cons of working from home?"]
    CODE = ["Write a Python function that returns the n-th Fibonacci number iteratively."]

SHORT = [
    "Hi!",
    "What is the capital of France?",
    "Give me one word for happy.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]
# Completion prompts: plain text to continue (code heads and prose).
COMPLETION_PROMPTS = [
    "def fibonacci(n):",
    "The three most important things to pack for a hiking trip are",
    "import os\n\ndef largest_files(directory, n=10):\n    ",
    "Once upon a time, a lighthouse keeper",
    "class Stack:\n    def __init__(self):\n",
    "A refrigerator keeps food cold by",
]

MAX_TOKENS = int(os.environ.get("GORGON_LT_MAX_TOKENS", "32"))
TEMPERATURE = float(os.environ.get("GORGON_LT_TEMPERATURE", "0.7"))
TIMEOUT = float(os.environ.get("GORGON_LT_TIMEOUT", "300"))
API_KEY = os.environ.get("GORGON_LT_API_KEY") or os.environ.get("OPENAI_API_KEY")
WAIT_MIN, WAIT_MAX = (float(x) for x in os.environ.get("GORGON_LT_WAIT", "0.5,2").split(","))
TURNS = int(os.environ.get("GORGON_LT_TURNS", "4"))


def chat_prompt(rng: random.Random) -> str:
    """Mix: 45% chat, 35% code, 20% short questions."""
    r = rng.random()
    pool = CHAT if r < 0.45 else CODE if r < 0.80 else SHORT
    return rng.choice(pool)


def fire(request_type: str, name: str, ms: float, length: int = 0, exception: Exception | None = None) -> None:
    events.request.fire(request_type=request_type, name=name, response_time=ms, response_length=length,
                        exception=exception, context={})


class StreamError(Exception):
    pass


class OpenAIUser(HttpUser):
    abstract = True
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.headers = {"Content-Type": "application/json"}
        if API_KEY:
            self.headers["Authorization"] = f"Bearer {API_KEY}"
        self.model = os.environ.get("GORGON_LT_MODEL")
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="GET /v1/models",
                                 timeout=TIMEOUT, catch_response=True) as resp:
                try:
                    self.model = resp.json()["data"][0]["id"]
                except Exception as exc:  # noqa: BLE001 - reported to locust as a failure
                    resp.failure(f"cannot read the model id: {exc!r}")

    def body(self, **fields) -> dict:
        body = {"max_tokens": MAX_TOKENS, "temperature": TEMPERATURE, **fields}
        if self.model:
            body["model"] = self.model
        return body

    def post(self, path: str, body: dict, name: str) -> None:
        """A non-streamed request: 200, at least one choice, and usage."""
        with self.client.post(path, json=body, headers=self.headers, name=name, timeout=TIMEOUT,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
                if data["usage"]["completion_tokens"] <= 0 and not text:
                    resp.failure("empty answer")
            except Exception as exc:  # noqa: BLE001
                resp.failure(f"malformed response: {exc!r}")

    def stream(self, path: str, body: dict, label: str) -> str | None:
        """A streamed request; reports the request, its TTFT and its inter-token gaps, and
        returns its text (None when it failed).

        Times are taken when each SSE event arrives at the client: TTFT is from sending the
        request to the first event that carries text, ITL the gaps between consecutive
        events that carry text (a server that sends several tokens in one event, as a
        speculative step may, shows one gap for them)."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        done = False
        events_with_text = received = 0
        pieces: list[str] = []
        with self.client.post(path, json=body, headers=self.headers, name=f"POST {label}", timeout=TIMEOUT,
                              stream=True, catch_response=True) as resp:
            try:
                if resp.status_code != 200:
                    raise StreamError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                for raw in resp.iter_lines(decode_unicode=True):
                    received += len(raw) + 1
                    if not raw:
                        continue
                    if not raw.startswith("data:"):
                        continue  # comments / keep-alives
                    payload = raw[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise StreamError(f"error event: {chunk['error']}")
                    text = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                                   for c in chunk.get("choices") or [])
                    if not text:
                        continue
                    pieces.append(text)
                    now = time.perf_counter()
                    events_with_text += 1
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                if not done:
                    raise StreamError("stream ended without [DONE]")
                if first is None:
                    raise StreamError("stream carried no text")
            except Exception as exc:  # noqa: BLE001 - every failure is reported to locust
                resp.failure(exc if isinstance(exc, StreamError) else StreamError(repr(exc)))
                return None
            finally:
                # locust times a streamed request to its headers; report the whole stream instead
                resp.request_meta["response_time"] = (time.perf_counter() - started) * 1e3
                resp.request_meta["response_length"] = received
            resp.success()
        fire("SSE", f"TTFT {label}", (first - started) * 1e3, events_with_text)
        for gap in gaps:
            fire("SSE", f"ITL {label}", gap * 1e3)
        return "".join(pieces)


class ChatStreamUser(OpenAIUser):
    weight = 3

    @task
    def chat_stream(self) -> None:
        self.stream("/v1/chat/completions",
                    self.body(messages=[{"role": "user", "content": chat_prompt(self.rng)}]), "chat-stream")


class ChatUser(OpenAIUser):
    weight = 2

    @task
    def chat(self) -> None:
        self.post("/v1/chat/completions", self.body(messages=[{"role": "user", "content": chat_prompt(self.rng)}]),
                  "POST chat")


class ConversationUser(OpenAIUser):
    weight = 2

    def on_start(self) -> None:
        super().on_start()
        self.messages: list[dict] = []

    @task
    def next_turn(self) -> None:
        if len(self.messages) >= 2 * TURNS:
            self.messages = []   # a new conversation
        self.messages.append({"role": "user", "content": chat_prompt(self.rng)})
        answer = self.stream("/v1/chat/completions", self.body(messages=self.messages), "conversation")
        if answer is None:
            self.messages = []
        else:
            self.messages.append({"role": "assistant", "content": answer})


class CompletionUser(OpenAIUser):
    weight = 1

    @task
    def completion(self) -> None:
        self.post("/v1/completions", self.body(prompt=self.rng.choice(COMPLETION_PROMPTS)), "POST completion")

    @task
    def completion_stream(self) -> None:
        self.stream("/v1/completions", self.body(prompt=self.rng.choice(COMPLETION_PROMPTS)), "completion-stream")
