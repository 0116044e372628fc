"""From accepted token ids to safe text deltas: detokenization, stop tokens and stop strings.

Several tokens may arrive at once (a speculative step). Text that might be the start of a
stop string is held back until it is clearly not, so a stop string never leaks into the
output, even when it straddles tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.tokenizer import IncrementalDetokenizer, Tokenizer
from server.sequence import Sequence


@dataclass
class OutputState:
    detokenizer: IncrementalDetokenizer
    emitted: int = 0          # characters of detokenizer.text already handed out


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        seq.output_state = OutputState(IncrementalDetokenizer(self.tokenizer, seq.prompt_ids))

    def append(self, seq: Sequence, new_ids: list[int]) -> tuple[list[int], str, int]:
        """Append accepted tokens to seq, stopping where a stop rule fires.

        Returns the token ids actually appended, the text delta to send, and how many of the
        appended tokens the output holds: all but a stop token that ended it, and none past
        the one where a stop string starts (their log-probabilities are reported). Sets
        seq.finish_reason when the sequence is done.
        """
        params = seq.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.eos_token_ids
        appended, kept = [], len(new_ids)
        for token in new_ids:
            seq.token_ids.append(token)
            appended.append(token)
            if token in stop_ids:
                seq.finish_reason = "stop"
                kept = len(appended) - 1
                break
            if seq.grammar is not None and seq.grammar.advance(token):   # only EOS could follow
                seq.error = seq.grammar.error
                seq.finish_reason = "stop" if seq.error is None else "error"
                break
            if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
                break
        state: OutputState = seq.output_state
        state.detokenizer.add(appended)
        text = state.detokenizer.text
        end = len(text)
        if params.stop:
            search_from = max(0, state.emitted - max(len(s) for s in params.stop) + 1)
            hits = [i for i in (text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                end = min(hits)
                seq.finish_reason = "stop"
                kept = self._tokens_before(seq, len(appended), end)
            elif seq.finish_reason is None:
                end -= held_back(text, params.stop)
        delta = text[state.emitted:end] if end > state.emitted else ""
        state.emitted = max(state.emitted, end)
        return appended, delta, min(kept, len(appended))

    def _tokens_before(self, seq: Sequence, count: int, end: int) -> int:
        """Of the last `count` output tokens, how many the first `end` characters of the
        output need (the text up to a stop string; rare: once a request, at its end)."""
        output, first = seq.output_ids, seq.num_output_tokens - count
        for used in range(first, len(output) + 1):
            if len(self.tokenizer.decode(output[:used])) >= end:
                return used - first
        return count
