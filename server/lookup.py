"""Context lookup: a draft branch copied from the sequence's own text.

Answers repeat their prompt and themselves (names in code, phrases in lists, and a small
model's greedy loops). When the last n tokens (n from MAX_MATCH down to MIN_MATCH) occurred
earlier in the prompt or the output, the tokens that followed that earlier occurrence are a
cheap guess for what comes next. The speculation policy hangs the guess as one more chain
under the root of a sequence's candidate tree (server/tree.py, LOOKUP_RANK), and the same
verification keeps whichever branch, the heads' or the lookup's, matches longer; the output
is unchanged. On the base model's greedy answers to the evaluation prompts, a chain of up to
8 tokens after a match of >= 2 kept 0.60 (chat) and 1.35 (code) tokens per step while
proposing 1.9 and 2.6 (docs/benchmarks.md): several times more per verified token than
the heads' deeper guesses.
"""
from __future__ import annotations

MIN_MATCH = 2
MAX_MATCH = 4
MAX_CANDIDATES = 32  # earlier occurrences of the last MIN_MATCH tokens tried, latest first


class ContextIndex:
    """Where each MIN_MATCH-gram of one sequence's tokens occurred, grown as tokens arrive
    (a sequence only ever appends), so a lookup costs the candidates it tries, not a scan."""

    def __init__(self):
        self.after: dict[tuple[int, ...], list[int]] = {}  # gram -> indices of the token after it
        self.indexed = MIN_MATCH  # grams ending before this index are in `after`

    def continuation(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens tokens that followed the earlier occurrence of the longest
        suffix (MAX_MATCH..MIN_MATCH tokens) of token_ids, the latest among equals; []
        when the last MIN_MATCH tokens never occurred before."""
        end = len(token_ids)
        if end < self.indexed:  # tokens were taken back: start over
            self.after, self.indexed = {}, MIN_MATCH
        for i in range(self.indexed, end):  # every gram that has a token after it
            self.after.setdefault(tuple(token_ids[i - MIN_MATCH:i]), []).append(i)
        self.indexed = max(self.indexed, end)
        if max_tokens <= 0 or end <= MIN_MATCH:
            return []
        best, best_len = None, 0
        for start in reversed(self.after.get(tuple(token_ids[end - MIN_MATCH:]), [])[-MAX_CANDIDATES:]):
            length = MIN_MATCH
            while (length < MAX_MATCH and start - length - 1 >= 0
                   and token_ids[start - length - 1] == token_ids[end - length - 1]):
                length += 1
            if length > best_len:
                best, best_len = start, length
                if length == MAX_MATCH:
                    break
        return [] if best is None else token_ids[best:best + max_tokens]
