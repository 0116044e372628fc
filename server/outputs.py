"""What the engine hands back to the HTTP layer after each step, per request."""
from __future__ import annotations

from dataclasses import dataclass

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, top-k and
    top-p) and the likeliest tokens' (id, log-probability), best first."""
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    text: str                   # new text since the last output (stop strings never included)
    token_ids: list[int]        # new token ids since the last output
    finish_reason: str | None   # None while running; else one of FINISH_REASONS
    num_prompt_tokens: int
    num_output_tokens: int      # generated so far (all of them, also those cut by a stop string)
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it was first scheduled
    # when the request asked for them: one per token id of the output's text (a prefix of
    # token_ids: a stop token, and tokens past a stop string, have none)
    logprobs: tuple[TokenLogprob, ...] | None = None
    # the first output of a request that asked for them: one per prompt token (None for the first)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
