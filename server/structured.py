"""Structured outputs: text that must follow a grammar (a JSON schema, any JSON object, a
regular expression, a choice among strings, or a Lark grammar), through llguidance, the
grammar engine vLLM and SGLang also use.

Every row that chooses a token gets the grammar's mask for the state after its own context:
the request's output so far and, for a speculative tree node, the drafted tokens on its
path. So a tree keeps exactly what plain decoding under the grammar picks; a drafted token
the grammar forbids is never kept, since its parent's row cannot choose it. A request ends
("stop") as soon as its grammar is complete: nothing but EOS could follow.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import torch

from models.tokenizer import Tokenizer

logger = logging.getLogger("gorgon.structured")
_SHIFTS = torch.arange(32, dtype=torch.int32)
KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


def grammar_from(kind: str, value: Any) -> str:
    """A request's constraint -> llguidance's grammar text. ValueError for a malformed one
    (whether it compiles is checked against the tokenizer: StructuredOutputs.check)."""
    from llguidance import LLMatcher

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"})
    if kind == "json_schema":
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError("a JSON schema must be an object")
        return LLMatcher.grammar_from_json_schema(value)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("a choice needs one or more non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if kind == "grammar":
        return LLMatcher.grammar_from_lark(value)
    raise ValueError(f"unknown constraint {kind!r}; one of {KINDS}")


class StructuredOutputs:
    """The engine's grammar compiler: llguidance's view of the tokenizer (built once, on
    first use: ~0.3 s for the default model's) and a matcher per request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltokenizer is None:
                import llguidance.hf
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer.hf, n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.eos_token_ids))
            return self._lltokenizer

    def check(self, grammar: str) -> str | None:
        """Why the grammar cannot be used, or None."""
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        return messages[0] if is_error else None

    def grammar(self, grammar: str) -> Grammar:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        return Grammar(matcher, self.vocab_size)


class Grammar:
    """One request's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32   # the mask: a bit per token

    def advance(self, token: int) -> bool:
        """Follow a generated token; True when the grammar is complete (only EOS could follow)."""
        if not self.matcher.consume_token(token):
            logger.warning("a generated token left the grammar: %s", self.matcher.get_error())
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor, rows: list[int], paths: list[tuple[int, ...]]) -> None:
        """Forbid, on logits row rows[j], what the grammar forbids after the output and then
        paths[j] (drafted tokens). A row whose path the grammar already forbids is left as
        it is: its node cannot be kept, so its row is never read."""
        bits = torch.empty(len(rows), self.words, dtype=torch.int32)
        masked = []
        for j, path in enumerate(paths):
            followed = self.matcher.try_consume_tokens(list(path)) if path else 0
            if followed == len(path):
                self.matcher.unsafe_compute_mask_ptr(bits[len(masked)].data_ptr(), self.words * 4)
                masked.append(rows[j])
            if followed:
                self.matcher.rollback(followed)
        if not masked:
            return
        allowed = ((bits[:len(masked)].unsqueeze(-1) >> _SHIFTS) & 1).view(len(masked), -1)[:, :logits.shape[1]]
        index = torch.tensor(masked, device=logits.device)
        logits[index] = logits[index].masked_fill(allowed.to(logits.device) == 0, float("-inf"))
