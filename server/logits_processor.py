"""A request's own changes to the logits before a token is chosen: `logit_bias`,
`min_tokens`, and the repetition, frequency and presence penalties.

Every logits row chooses one token after a context: the request's output so far and, for a
node of a candidate tree, the drafted tokens on its path below the root (the root's own
row: the output alone). Each row is changed from its own context, so a tree's rows get the
very logits plain decoding would have at that point, and speculation stays exact with
penalties on. In this order, as vLLM applies them:

1. `logit_bias`: a bias added to the named tokens' logits;
2. `min_tokens`: the stop tokens (EOS unless ignored, and `stop_token_ids`) masked while
   the output is shorter;
3. `repetition_penalty` r (Hugging Face's, over prompt and output tokens): a seen token's
   logit is divided by r where positive, multiplied by r where not;
4. `frequency_penalty` f and `presence_penalty` p (OpenAI's, over output tokens): a token
   seen c times loses f c + p [c > 0].

Log-probabilities are reported from the changed logits (the distribution the token was
chosen from, before temperature, top-k and top-p).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from server.sampling_params import SamplingParams


@dataclass
class TokenCounts:
    """A request's output tokens, counted as they come (the penalties' context), and the set
    of its prompt's tokens (the repetition penalty's)."""
    output: Counter = field(default_factory=Counter)
    counted: int = 0   # output tokens counted so far
    prompt: frozenset[int] | None = None

    def update(self, prompt_ids: list[int], token_ids: list[int]) -> None:
        """Count the output tokens (token_ids past the prompt) not yet counted."""
        start = len(prompt_ids) + self.counted
        if len(token_ids) > start:
            self.output.update(token_ids[start:])
            self.counted = len(token_ids) - len(prompt_ids)
        if self.prompt is None:
            self.prompt = frozenset(prompt_ids)


def changes_logits(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.min_tokens or params.repetition_penalty != 1.0
                or params.frequency_penalty or params.presence_penalty)


def process_logits(logits: torch.Tensor, rows: list[int], paths: list[tuple[int, ...]], params: SamplingParams,
                   counts: TokenCounts, stop_ids: frozenset[int]) -> None:
    """Change logits [N, vocab] in place for one request: rows[j] chooses the token after
    its output so far (counts, already updated) and then paths[j], the drafted tokens on
    that row's tree path (empty for a plain step's row or a tree's root). stop_ids: what
    min_tokens holds back (EOS unless ignored, and stop_token_ids)."""
    index = torch.tensor(rows, device=logits.device).unsqueeze(1)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        columns = torch.tensor(ids, device=logits.device).unsqueeze(0)
        logits[index, columns] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if params.min_tokens and stop_ids:
        held = [j for j, path in enumerate(paths) if counts.counted + len(path) < params.min_tokens]
        if held:
            columns = torch.tensor(sorted(stop_ids), device=logits.device).unsqueeze(0)
            logits[index[held], columns] = float("-inf")
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        _penalize(logits, index, paths, params, counts)


def _penalize(logits: torch.Tensor, index: torch.Tensor, paths: list[tuple[int, ...]], params: SamplingParams,
              counts: TokenCounts) -> None:
    """The penalties over the tokens any row has seen: one gather, a few [rows, seen]
    operations and one scatter, whatever the vocabulary."""
    repetition = params.repetition_penalty != 1.0
    seen = set(counts.output).union(*paths)
    if repetition:
        seen |= counts.prompt
    if not seen:
        return
    tokens = sorted(seen)
    column = {token: i for i, token in enumerate(tokens)}
    device = logits.device
    times = torch.tensor([counts.output.get(t, 0) for t in tokens], dtype=torch.float32,
                         device=device).repeat(len(paths), 1)   # [rows, seen]: each row's count of each token
    on_path = [(j, column[t]) for j, path in enumerate(paths) for t in path]
    if on_path:
        at = torch.tensor(on_path, device=device)
        times.index_put_((at[:, 0], at[:, 1]), torch.ones(len(on_path), device=device), accumulate=True)
    columns = torch.tensor(tokens, device=device).unsqueeze(0)
    values = logits[index, columns].float()
    if repetition:
        r = params.repetition_penalty
        hit = times > 0
        if counts.prompt:
            hit |= torch.tensor([t in counts.prompt for t in tokens], device=device).unsqueeze(0)
        values = torch.where(hit, torch.where(values > 0, values / r, values * r), values)
    if params.frequency_penalty:
        values = values - params.frequency_penalty * times
    if params.presence_penalty:
        values = values - params.presence_penalty * (times > 0).float()
    logits[index, columns] = values.to(logits.dtype)
