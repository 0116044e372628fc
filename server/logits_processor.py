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

from dataclasses import dataclass, field

import torch

from server.sampling_params import SamplingParams


@dataclass
class TokenCounts:
    """A request's output tokens counted per vocabulary entry as they come, its prompt's
    tokens as a mask (the repetition penalty's), and the sorted ids each has seen: tensors on
    the logits' device, updated with each step's new tokens only, so a step's work does not
    grow with the text."""
    output: torch.Tensor | None = None   # [vocab] float32: each token's count in the output so far
    prompt: torch.Tensor | None = None   # [vocab] bool: in the prompt
    seen: torch.Tensor | None = None     # the output's distinct token ids (in no order)
    seen_all: torch.Tensor | None = None  # the prompt's and the output's
    counted: int = 0                     # output tokens counted so far
    _seen_ids: set = field(default_factory=set)     # the same as Python sets: a step adds a few tokens
    _prompt_ids: frozenset = frozenset()

    def update(self, prompt_ids: list[int], token_ids: list[int], vocab_size: int, device: torch.device) -> None:
        """Count the output tokens (token_ids past the prompt) not yet counted."""
        if self.output is None:
            self._prompt_ids = frozenset(prompt_ids)
            prompt = torch.tensor(sorted(self._prompt_ids), device=device)
            self.output = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.prompt[prompt] = True
            self.seen, self.seen_all = prompt[:0], prompt
        start = len(prompt_ids) + self.counted
        if len(token_ids) > start:
            new = token_ids[start:]
            self.output.index_add_(0, torch.tensor(new, device=device), torch.ones(len(new), device=device))
            fresh = [t for t in dict.fromkeys(new) if t not in self._seen_ids]
            if fresh:
                self._seen_ids.update(fresh)
                self.seen = torch.cat([self.seen, torch.tensor(fresh, device=device)])
                beyond = [t for t in fresh if t not in self._prompt_ids]
                if beyond:
                    self.seen_all = torch.cat([self.seen_all, torch.tensor(beyond, device=device)])
            self.counted = len(token_ids) - len(prompt_ids)


@dataclass(frozen=True)
class Job:
    """One request's rows of a step: rows[j] chooses the token after its output so far
    (counts, already updated) and then paths[j], the drafted tokens on that row's tree path
    (empty for a plain step's row or a tree's root). stop_ids: what min_tokens holds back
    (EOS unless ignored, and stop_token_ids)."""
    rows: list[int]
    paths: list[tuple[int, ...]]
    params: SamplingParams
    counts: TokenCounts
    stop_ids: frozenset[int]


def changes_logits(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.min_tokens or params.repetition_penalty != 1.0
                or params.frequency_penalty or params.presence_penalty)


def process_logits(logits: torch.Tensor, jobs: list[Job]) -> None:
    """Change logits [N, vocab] in place for the step's requests that ask: each one's bias
    and min_tokens, then every request's penalties in one gather, a few operations and one
    scatter over the entries (row, token seen by that row)."""
    entries, penalties = [], []
    for job in jobs:
        params = job.params
        if params.logit_bias or params.min_tokens:
            _bias_and_min_tokens(logits, job)
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            entries.append(_entries(job, logits.device))
            penalties.append((params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
    if len(entries) == 1:   # one request's penalties: its entries share them
        _penalize(logits, list(entries[0]), torch.tensor(penalties, device=logits.device))
    elif entries:
        counts = torch.tensor([len(part[0]) for part in entries], device=logits.device)
        per_entry = torch.tensor(penalties, device=logits.device).repeat_interleave(counts, dim=0)
        _penalize(logits, [torch.cat(part) for part in zip(*entries)], per_entry)


def _bias_and_min_tokens(logits: torch.Tensor, job: Job) -> None:
    params, index = job.params, torch.tensor(job.rows, device=logits.device).unsqueeze(1)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        columns = torch.tensor(ids, device=logits.device).unsqueeze(0)
        logits[index, columns] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if params.min_tokens and job.stop_ids:
        held = [j for j, path in enumerate(job.paths) if job.counts.counted + len(path) < params.min_tokens]
        if held:
            rows, columns = index[held], torch.tensor(sorted(job.stop_ids), device=logits.device).unsqueeze(0)
            stops = logits[rows, columns]
            logits[rows, columns] = float("-inf")
            left = logits[rows.view(-1)].amax(dim=-1) > float("-inf")
            if not bool(left.all()):   # a grammar allows nothing but a stop token: it may end
                logits[rows[~left], columns] = stops[~left]


def _entries(job: Job, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A request's penalty entries, flat: (row, token, count in that row's context, in the
    prompt), one per row and token any of its rows has seen (a token another row's path
    holds counts 0 in this one: unchanged)."""
    params, counts, paths = job.params, job.counts, job.paths
    repetition = params.repetition_penalty != 1.0
    columns = counts.seen_all if repetition else counts.seen
    on_path = [t for path in paths for t in path]
    if on_path:
        on_path = torch.tensor(on_path, device=device)
        columns = torch.unique(torch.cat([columns, on_path]))
    times = counts.output[columns].expand(len(paths), -1)   # [rows, seen]: each row's count of each token
    if len(on_path):   # a tree node's path counts as output for its row
        times = times.clone()
        rows = torch.tensor([j for j, path in enumerate(paths) for _ in path], device=device)
        times.index_put_((rows, torch.searchsorted(columns, on_path)), torch.ones(len(rows), device=device),
                         accumulate=True)
    shape = times.shape
    index = torch.tensor(job.rows, device=device).unsqueeze(1).expand(shape).reshape(-1)
    in_prompt = counts.prompt[columns] if repetition else torch.zeros_like(columns, dtype=torch.bool)
    return index, columns.expand(shape).reshape(-1), times.reshape(-1), in_prompt.expand(shape).reshape(-1)


def _penalize(logits: torch.Tensor, entries: list[torch.Tensor], penalties: torch.Tensor) -> None:
    """The penalties on the flat entries (penalties [entries or 1, 3]: each one's request's
    repetition, frequency and presence penalties). A repetition penalty of 1, a frequency or
    presence penalty of 0 changes no bit, so one formula serves every request."""
    rows, columns, times, in_prompt = entries
    repetition, frequency, presence = penalties.unbind(1)
    values = logits[rows, columns].float()
    hit = (times > 0) | in_prompt
    values = torch.where(hit, torch.where(values > 0, values / repetition, values * repetition), values)
    values = values - frequency * times
    values = values - presence * (times > 0).float()
    logits[rows, columns] = values.to(logits.dtype)
