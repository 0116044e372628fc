"""Turning logits into a distribution (temperature, top-k, top-p) and drawing from it."""
from __future__ import annotations

import torch

from models.cpu_kernels import cpu_kernels
from server.sampling_params import SamplingParams

TOP_P_CANDIDATES = 256
MIN_LOGPROB = -9999.0   # reported for impossible tokens


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """logits [N, vocab] -> each row's argmax, torch.argmax's choice (the first largest); on
    the CPU through Gorgon's vector kernel (PyTorch's is scalar: ~90 us a row of 49k logits,
    a few percent of a batch-1 step, more for trees and batches)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]:
        kernels = cpu_kernels()
        if kernels is not None:
            return kernels.argmax_rows(logits.contiguous()).tolist()
    return logits.argmax(-1).tolist()


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int,
                   rows_per_call: int = 128) -> list[tuple[float, list[tuple[int, float]]]]:
    """logits [N, vocab] and a token per row -> each token's log-probability under the row's
    own distribution (no temperature, top-k or top-p) and the row's `top` likeliest tokens
    with theirs, best first. In calls of rows_per_call rows: a scored prompt chunk's
    hundreds of rows would otherwise take a few copies of all its logits at once."""
    out = []
    for first in range(0, len(tokens), rows_per_call):
        # clamped as vLLM does: a token a grammar forbids has -inf, which JSON cannot carry
        logprobs = torch.log_softmax(logits[first:first + rows_per_call].float(), dim=-1).clamp_(min=MIN_LOGPROB)
        targets = torch.tensor(tokens[first:first + rows_per_call], device=logits.device).view(-1, 1)
        chosen = logprobs.gather(1, targets).view(-1).tolist()
        if not top:
            out += [(lp, []) for lp in chosen]
            continue
        best = logprobs.topk(top, dim=-1)
        out += [(lp, list(zip(ids, values))) for lp, ids, values in
                zip(chosen, best.indices.tolist(), best.values.tolist())]
    return out


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, vocab] -> probabilities [N, vocab] after temperature, top-k and top-p.

    Greedy requests get a one-hot distribution on the argmax.
    """
    logits = logits.float()
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return _nucleus(probs, params.top_p) if params.top_p < 1.0 else probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p: each row keeps its likeliest tokens until they reach top_p (a token is dropped
    when the tokens ranked above it already do), renormalized. A row's nucleus is looked for
    among its TOP_P_CANDIDATES likeliest tokens first, 4x more while it is not complete (only
    for the rows that need it, so that a row's result never depends on the rows beside it): a
    full sort of a 49k vocabulary costs ~1.9 ms a row on a CPU, more than a plain step's
    forward, the top 256 ~0.1 ms, and a sampling distribution rarely spreads its top_p
    beyond them."""
    out = torch.zeros_like(probs)
    vocab, k = probs.shape[-1], min(TOP_P_CANDIDATES, probs.shape[-1])
    rows = None   # the rows still looking (None: all of them)
    while True:
        top, order = torch.topk(probs if rows is None else probs[rows], k, dim=-1)   # likeliest first
        drop = top.cumsum(-1) - top >= top_p
        done = drop[:, -1] if k < vocab else torch.ones_like(drop[:, -1])   # the nucleus ends within the top k
        kept = top.masked_fill(drop, 0.0)
        kept = kept / kept.sum(-1, keepdim=True)
        if rows is None and bool(done.all()):
            return out.scatter_(-1, order, kept)
        looked = torch.arange(len(probs), device=probs.device) if rows is None else rows
        out[looked[done]] = out[looked[done]].scatter_(-1, order[done], kept[done])
        rows = looked[~done]
        if not len(rows):
            return out
        k = min(4 * k, vocab)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [N, vocab] (each row's sum need not be 1) -> token ids [N]: one uniform draw per
    row, found in the running sum (inverse transform sampling). On a CPU 15x faster than
    torch.multinomial over a 49k vocabulary (0.07 against 1.1 ms a row), which a plain step
    at temperature > 0 paid on top of its ~11 ms forward."""
    cumulative = probs.float().cumsum(-1)
    total = cumulative[:, -1:]
    draw = torch.rand(total.shape, generator=generator, device=probs.device) * total
    # strictly below the total: the first running sum above the draw is then a token of
    # non-zero probability (its sum rose past the draw)
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))
    # a row with no probability left (NaN) must still give a token id, never one past the vocabulary
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from the filtered distribution."""
    if params.is_greedy:
        return logits.argmax(-1)
    return sample(probabilities(logits, params), generator)
