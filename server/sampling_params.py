"""How one request wants its tokens chosen and when it stops. Validated once, at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field

# Typical acceptance (Medusa): accept a drafted token x when p(x) > min(epsilon, delta * exp(-H(p))).
TYPICAL_EPSILON = 0.09
TYPICAL_DELTA = 0.3
ACCEPTANCE_RULES = ("typical", "rejection")
MAX_LOGPROBS = 20   # alternatives per token (OpenAI's chat limit)
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    acceptance: str = "typical"         # rule for drafted tokens when temperature > 0
    typical_epsilon: float = TYPICAL_EPSILON
    typical_delta: float = TYPICAL_DELTA
    speculate: bool = True              # False: one token per step for this request
    cache_salt: str | None = None       # the prefix cache shares blocks only among requests of one salt
    logprobs: int | None = None         # each token's log-probability and this many likeliest alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (its first token has none)
    # the logits' changes (server/logits_processor.py)
    presence_penalty: float = 0.0       # OpenAI's: minus this from each token in the output so far
    frequency_penalty: float = 0.0      # OpenAI's: minus this times the token's count in the output so far
    repetition_penalty: float = 1.0     # Hugging Face's, over prompt and output: 1 is off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    min_tokens: int = 0                 # no EOS or stop token id before this many output tokens
    grammar: str | None = None          # structured outputs: llguidance's grammar text (server/structured.py)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):   # 0: score the prompt only
            raise ValueError(f"max_tokens must be at least 1 (0 only to score a prompt), got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance must be one of {ACCEPTANCE_RULES}, got {self.acceptance!r}")
        if not 0.0 <= self.typical_epsilon <= 1.0 or not 0.0 <= self.typical_delta <= 1.0:
            raise ValueError("typical_epsilon and typical_delta must be between 0 and 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must not be negative")
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(self, name)
            if count is not None and not 0 <= count <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {count}")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("cache_salt must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("logit_bias names a token twice")
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias maps token ids (>= 0) to biases between -100 and 100, got {token}: {bias}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
