"""A tiny stand-in for LLMEngine, for unit tests of the async loop and the HTTP formatting.

It "generates" the words of a fixed script, one token per step, with the real tokenizer's
ids. The end-to-end tests in test_server_*.py run the real engine.
"""
from __future__ import annotations

import threading
import time

from server.outputs import RequestOutput
from server.sampling_params import SamplingParams

SCRIPT = " one two three four five six seven eight nine ten eleven twelve"


class FakeTokenizer:
    """Words are tokens: id i is WORDS[i]; text splits on spaces."""
    WORDS = ["<eos>"] + SCRIPT.split()

    vocab_size = len(WORDS)
    eos_token_ids = frozenset({0})
    has_chat_template = True
    renders_tools = False

    def encode(self, text: str) -> list[int]:
        return [self.WORDS.index(w) if w in self.WORDS else 1 for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(" " + self.WORDS[i] for i in ids)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages)) or [1]


class FakeEngine:
    model_name = "fake-model"
    max_model_len = 64

    def __init__(self, fail_on: str | None = None, step_delay: float = 0.01):
        self.step_delay = step_delay
        self.tokenizer = FakeTokenizer()
        self.fail_on = fail_on            # a step holding a prompt with this word raises
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.aborted: list[str] = []
        self.gate = threading.Event()     # step() blocks until set (tests pace the engine)
        self.gate.set()
        self.waiting = 0

    @property
    def num_waiting(self) -> int:
        return self.waiting

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + {params.max_tokens} > {self.max_model_len}")
        self.requests[request_id] = (prompt_ids, params, [])

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.gate.wait(5)
        time.sleep(self.step_delay)
        fail_id = self.tokenizer.encode(self.fail_on)[0] if self.fail_on else None
        if fail_id is not None and any(fail_id in p for p, _, _ in self.requests.values()):
            raise RuntimeError("boom")
        outputs = []
        for request_id, (prompt, params, out) in list(self.requests.items()):
            token = len(out) % (len(FakeTokenizer.WORDS) - 1) + 1
            out.append(token)
            finish = "length" if len(out) >= params.max_tokens else None
            if finish:
                del self.requests[request_id]
            outputs.append(RequestOutput(request_id, self.tokenizer.decode([token]), [token], finish,
                                         len(prompt), len(out)))
        return outputs
