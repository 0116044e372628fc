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
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from models.tokenizer import Tokenizer

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
MAX_GRAMMAR_CHARS = 256 * 1024   # of compiled grammar text a request may bring
# JSON's whitespace between tokens: up to 32 spaces or tabs, or one line break and an
# indentation of at most 32. Free whitespace lets a small model emit line breaks until
# max_tokens (seen: thousands at temperature 0.8). A schema whose own "x-guidance" options
# set its whitespace keeps them.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x09]{1,32}|\x0D?\x0A[\x20\x09]{0,32}"}
WHITESPACE_OPTIONS = ("whitespace_flexible", "whitespace_pattern", "item_separator", "key_separator")


def grammar_from(kind: str, value: Any) -> str:
    """A request's constraint -> llguidance's grammar text. ValueError for a malformed one
    (whether it compiles is checked against the tokenizer: StructuredOutputs.check)."""
    from llguidance import LLMatcher

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
    if kind == "json_schema":
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError("a JSON schema must be an object")
        own = value.get("x-guidance")
        if isinstance(own, dict) and any(key in own for key in WHITESPACE_OPTIONS):
            return LLMatcher.grammar_from_json_schema(value)
        return LLMatcher.grammar_from_json_schema(value, JSON_OPTIONS)
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
    first use: ~0.3 s for the default model's) and compiled grammars, kept so that a
    request's matcher is a copy of the one its check compiled (off the engine's thread:
    a large grammar can take a second to compile)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._lltokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()   # grammar text -> a fresh matcher
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
        """Why the grammar cannot be used, or None (it is then compiled and kept)."""
        if len(grammar) > MAX_GRAMMAR_CHARS:
            return f"the constraint is too large ({len(grammar)} characters compiled; at most {MAX_GRAMMAR_CHARS})"
        matcher = self._compile(grammar)
        return matcher.get_error() if matcher.is_error() else None

    def grammar(self, grammar: str) -> Grammar:
        """A new request's matcher; ValueError when the grammar cannot be used."""
        error = self.check(grammar)
        if error is not None:
            raise ValueError(f"the grammar cannot be used: {error}")
        return Grammar(self._compile(grammar).deep_copy(), self.vocab_size)

    def _compile(self, grammar: str):
        from llguidance import LLMatcher

        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher
        matcher = LLMatcher(self.lltokenizer, grammar, log_level=0)
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher


class Grammar:
    """One request's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32   # the mask: a bit per token

    @property
    def error(self) -> str | None:
        """Why the grammar cannot go on (a token it forbids, a resource limit), or None."""
        if not self.matcher.is_error():
            return None
        return (self.matcher.get_error() or "the grammar failed").splitlines()[0]   # not llguidance's state dump

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar forces next (at most limit): drafts that cost no guess."""
        return self.matcher.compute_ff_tokens()[:limit] if limit > 0 else []

    def advance(self, token: int) -> bool:
        """Follow a generated token; True when nothing but EOS could follow: the grammar is
        complete, or failed (`error`)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor, rows: list[int], paths: list[tuple[int, ...]]) -> None:
        """Forbid, on logits row rows[j], what the grammar forbids after the output and then
        paths[j] (drafted tokens)."""
        bits = masks(len(rows), logits.shape[1])
        self.fill(bits, paths)
        apply_masks(logits, rows, bits)

    def fill(self, bits: torch.Tensor, paths: list[tuple[int, ...]]) -> None:
        """bits[j] (from `masks`): the tokens the grammar allows after the output and then
        paths[j]. A row whose path the grammar already forbids allows everything: its node
        cannot be kept (its parent's row forbids it), so the row is never read."""
        for j, path in enumerate(paths):
            followed = self.matcher.try_consume_tokens(list(path)) if path else 0
            if followed == len(path):
                self.matcher.unsafe_compute_mask_ptr(bits[j].data_ptr(), self.words * 4)
            if followed:
                self.matcher.rollback(followed)


def masks(rows: int, vocab_size: int) -> torch.Tensor:
    """Packed masks for `rows` rows, every token allowed: bit t % 32 of word t // 32 is token t."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: list[int], bits: torch.Tensor) -> None:
    """Forbid on logits row rows[j] the tokens bits[j] does not allow (the step's grammar rows
    at once: one unpacking, one `torch.where`). A row a grammar leaves nothing to (it failed)
    keeps its logits: the token it gives ends the request with the grammar's error."""
    bits[(bits == 0).all(dim=1)] = -1
    allowed = _unpack(bits, logits.shape[1], logits.device)
    neg_inf = _NEG_INF.to(logits.device, logits.dtype)
    first = rows[0]
    if rows == list(range(first, first + len(rows))):   # a tree's rows, or consecutive ones: a view
        view = logits[first:first + len(rows)]
        torch.where(allowed, view, neg_inf, out=view)
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = torch.where(allowed, logits[index], neg_inf)


_NEG_INF = torch.tensor(float("-inf"))


def _unpack(bits: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Packed masks [rows, words] (bit t % 32 of word t // 32: token t) -> bool [rows, vocab],
    unpacked by numpy on the CPU (~0.03 ms a row with the fill) and on the device elsewhere."""
    if device.type == "cpu":
        unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
        return torch.from_numpy(np.ascontiguousarray(unpacked)).view(torch.bool)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    words = bits.to(device)
    return ((words.unsqueeze(-1) >> shifts) & 1).view(len(bits), -1)[:, :vocab_size].bool()
