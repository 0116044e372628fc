"""A request's own changes to the logits before a token is chosen: `logit_bias`,
`min_tokens`, and the repetition, frequency and presence penalties.

Every logits row chooses one token after a context: the request's output so far and, for a
node of a candidate tree, the drafted tokens on its path below the root (the root's own
row: the output alone). Each row is changed from its own context, so a tree's rows get the
very logits plain decoding would have at that point, and speculation stays exact with
penalties on. In this order, as vLLM applies them:

1. `logit_bias`: a bias added to the named tokens' logits;
2. `min_tokens`: the stop tokens (EOS unless ignored, and `stop_token_ids`) masked while
   the output is shorter, unless nothing else is left (a grammar that is complete);
3. `repetition_penalty` r (Hugging Face's, over prompt and output tokens): a seen token's
   logit is divided by r where positive, multiplied by r where not;
4. `frequency_penalty` f and `presence_penalty` p (OpenAI's, over output tokens): a token
   seen c times loses f c + p [c > 0].

Log-probabilities are reported from the changed logits (the distribution the token was
chosen from, before temperature, top-k and top-p).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.sampling_params import SamplingParams


@dataclass
class TokenCounts:
    """A request's output tokens counted per vocabulary entry as they come, and its prompt's
    tokens as a mask (the repetition penalty's): [vocab] tensors on the logits' device, so a
    step's work does not grow with the text."""
    output: torch.Tensor | None = None   # [vocab] float32: each token's count in the output so far
    prompt: torch.Tensor | None = None   # [vocab] bool: in the prompt
    counted: int = 0                     # output tokens counted so far

    def update(self, prompt_ids: list[int], token_ids: list[int], vocab_size: int, device: torch.device) -> None:
        """Count the output tokens (token_ids past the prompt) not yet counted."""
        if self.output is None:
            self.output = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.prompt[torch.tensor(prompt_ids, device=device)] = True
        start = len(prompt_ids) + self.counted
        if len(token_ids) > start:
            new = torch.tensor(token_ids[start:], device=device)
            self.output.index_add_(0, new, torch.ones(len(new), device=device))
            self.counted = len(token_ids) - len(prompt_ids)


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
            rows, columns = index[held], torch.tensor(sorted(stop_ids), device=logits.device).unsqueeze(0)
            stops = logits[rows, columns]
            logits[rows, columns] = float("-inf")
            left = logits[rows.view(-1)].amax(dim=-1) > float("-inf")
            if not bool(left.all()):   # a grammar allows nothing but a stop token: it may end
                logits[rows[~left], columns] = stops[~left]
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        _penalize(logits, index, paths, params, counts)


def _penalize(logits: torch.Tensor, index: torch.Tensor, paths: list[tuple[int, ...]], params: SamplingParams,
              counts: TokenCounts) -> None:
    """The penalties over the tokens any row has seen: one gather, a few [rows, seen]
    operations and one scatter."""
    device = logits.device
    repetition = params.repetition_penalty != 1.0
    seen = counts.output > 0
    if repetition:
        seen |= counts.prompt
    on_path = [t for path in paths for t in path]
    if on_path:
        on_path = torch.tensor(on_path, device=device)
        seen[on_path] = True
    columns = seen.nonzero().view(-1)   # ascending token ids
    if not len(columns):
        return
    times = counts.output[columns].repeat(len(paths), 1)   # [rows, seen]: each row's count of each token
    if len(on_path):   # a tree node's path counts as output for its row
        rows = torch.tensor([j for j, path in enumerate(paths) for _ in path], device=device)
        times.index_put_((rows, torch.searchsorted(columns, on_path)), torch.ones(len(rows), device=device),
                         accumulate=True)
    columns = columns.unsqueeze(0)
    values = logits[index, columns].float()
    if repetition:
        r = params.repetition_penalty
        hit = (times > 0) | counts.prompt[columns]
        values = torch.where(hit, torch.where(values > 0, values / r, values * r), values)
    if params.frequency_penalty:
        values = values - params.frequency_penalty * times
    if params.presence_penalty:
        values = values - params.presence_penalty * (times > 0).float()
    logits[index, columns] = values.to(logits.dtype)
