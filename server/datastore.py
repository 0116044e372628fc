"""Datastore lookup: draft chains copied from the base model's own earlier answers.

A small model answers alike across requests: code answers share their scaffolding
("Here is a Python function that", docstrings, `if __name__ == ...`), prose its stock
phrases. The datastore holds the base model's greedy answers to the training prompts (the
self-distilled data the heads learnt from, `models/train_heads.py` writes it beside them).
When a sequence's last n tokens (n from the longest the key packing allows down to
MIN_MATCH) occurred in it, the tokens that followed vote, one position at a time: the
chain takes the most common next token among the occurrences that agree with the chain so
far, and stops where the share of votes behind it, multiplied along the chain, falls below
MIN_CONFIDENCE (or the occurrences run out). REST (He et al., 2023) drafts from a
datastore with a suffix array and a trie; here sorted n-gram keys and a vote do the same
for one chain.

The chain stands in for a context-lookup chain (server/lookup.py, fed by the sequence's own
text, which goes first) and hangs under the root of the sequence's tree beside the heads'
nodes, never alone: the speculation policy prices each token at its confidence times the
sequence's calibration of such chains; verification decides, so the output never changes.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MIN_MATCH = 2
MAX_MATCH = 4
MAX_OCCURRENCES = 256   # occurrences of a matched n-gram that vote at most (an even sample of them)
MIN_CONFIDENCE = 0.1    # a chain stops where the product of its tokens' vote shares falls below this
SEPARATOR = -1          # between answers: never matched, and a vote for "the answer ended here"
TOKENS_KEY = "tokens"


class Datastore:
    """Answers as one token stream plus, per match length n, the sorted keys of every n-gram
    (n token ids packed into one uint64, exact) and where the token after each one is."""

    def __init__(self, tokens: np.ndarray, max_chain: int = 64):
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError("a datastore is one stream of token ids")
        if len(tokens) and tokens.min() < SEPARATOR:
            raise ValueError(f"a datastore holds token ids and {SEPARATOR} separators, not {int(tokens.min())}")
        self.max_chain = max_chain
        self.num_tokens = int((tokens != SEPARATOR).sum())
        self.max_token = int(tokens.max(initial=SEPARATOR))
        # trailing separators: a chain read past the end stops there
        self.stream = np.concatenate([tokens, np.full(max_chain + 1, SEPARATOR, dtype=np.int64)])
        self.bits = max(1, self.max_token).bit_length()
        self.max_match = min(MAX_MATCH, 64 // self.bits)
        self.keys: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for n in range(MIN_MATCH, self.max_match + 1):
            if len(tokens) <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(tokens, n)[:-1]  # gram ending before token i + n
            valid = (windows != SEPARATOR).all(axis=1)
            keys = self._pack(windows[valid])
            after = (np.nonzero(valid)[0] + n).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            self.keys[n] = (keys[order], after[order])

    def _pack(self, grams: np.ndarray) -> np.ndarray:
        keys = np.zeros(grams.shape[0], dtype=np.uint64)
        for j in range(grams.shape[1]):
            keys = (keys << np.uint64(self.bits)) | grams[:, j].astype(np.uint64)
        return keys

    @classmethod
    def from_answers(cls, answers: Iterable[list[int]]) -> Datastore:
        stream: list[int] = []
        for answer in answers:
            stream.extend(answer)
            stream.append(SEPARATOR)
        return cls(np.array(stream, dtype=np.int64))

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        return cls(load_file(str(path))[TOKENS_KEY].numpy())

    def save(self, path: str | Path) -> None:
        tokens = self.stream[: len(self.stream) - self.max_chain - 1]
        save_file({TOKENS_KEY: torch.from_numpy(tokens.astype(np.int32))}, str(path))

    def continuation(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens voted by the occurrences of the longest suffix of
        token_ids found in the store; [] when none is found or the first vote is too split."""
        return self.voted(token_ids, max_tokens)[0]

    def voted(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """continuation(), with each token's confidence (the product of vote shares up to it)."""
        max_tokens = min(max_tokens, self.max_chain)
        if max_tokens <= 0:
            return [], []
        for n in range(min(self.max_match, len(token_ids)), MIN_MATCH - 1, -1):
            if n not in self.keys:
                continue
            gram = token_ids[-n:]
            if max(gram) >= 1 << self.bits or min(gram) < 0:
                continue  # a token the store never saw
            keys, after = self.keys[n]
            key = 0
            for token in gram:   # _pack's key, in Python integers (a step's one lookup: no arrays)
                key = (key << self.bits) | token
            key = np.uint64(key)
            lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
            if hi > lo:  # a common gram: an even sample of its occurrences across the store
                return self._vote(after[lo:hi:-(-(hi - lo) // MAX_OCCURRENCES)], max_tokens)
        return [], []

    def _vote(self, starts: np.ndarray, max_tokens: int) -> tuple[list[int], list[float]]:
        chain: list[int] = []
        confidences: list[float] = []
        confidence = 1.0
        for depth in range(max_tokens):
            column = self.stream[starts + depth]
            votes = column.tolist()   # a few to MAX_OCCURRENCES: Python's counting is faster than np.unique
            counts = Counter(votes)
            counts.pop(SEPARATOR, None)
            if not counts:
                break
            most = max(counts.values())
            best = min(token for token, count in counts.items() if count == most)   # ties: the lowest id
            # an answer that ended here votes against, and so does one more, unseen
            # occurrence: a lone occurrence is a guess, not a certainty
            confidence *= most / (len(votes) + 1)
            if confidence < MIN_CONFIDENCE:
                break
            chain.append(best)
            confidences.append(float(confidence))
            starts = starts[column == best]
        return chain, confidences
