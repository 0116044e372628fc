"""Batched generation for offline data: many sequences per forward over the paged cache.

Used by head training (self-distillation): the base model answers many prompts at once and
we keep, for every generated token, the final hidden state that produced it. It is a small
continuously batched loop: finished sequences free their blocks and new prompts are
prefilled in the same forward as the running decode steps (causal prefills first, then the
one-token "trees" of the decoding sequences, as models/attention.py expects).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from models.attention import KVCache, TorchAttention, build_metadata
from models.llama import LlamaForCausalLM

BLOCK_SIZE = 16


@dataclass
class Completion:
    """One answered prompt. hidden[i] is the base model's final hidden state that produced
    output_ids[i] (at position len(prompt_ids) - 1 + i)."""
    index: int
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)  # per token [H], stacked at the end
    temperature: float = 0.0
    blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def hidden_states(self) -> torch.Tensor:
        """[len(output_ids), H]"""
        return torch.stack(self.hidden) if self.hidden else torch.empty(0)


@torch.inference_mode()
def generate_batch(model: LlamaForCausalLM, prompts: list[list[int]], temperatures: list[float],
                   max_new_tokens: int, stop_ids: frozenset[int], max_batch: int = 48,
                   max_prefill_tokens: int = 1024, keep_hidden: bool = True,
                   hidden_dtype: torch.dtype = torch.float16, seed: int = 0,
                   on_token: Callable[[int], None] | None = None) -> Iterator[Completion]:
    """Answer every prompt; yields each Completion as it finishes (not in prompt order)."""
    if len(prompts) != len(temperatures):
        raise ValueError("one temperature per prompt")
    config = model.config
    device = model.lm_head.weight.device
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    blocks_per_seq = -(-longest // BLOCK_SIZE)
    num_blocks = blocks_per_seq * max_batch
    cache = KVCache(config.num_hidden_layers, num_blocks, BLOCK_SIZE, config.num_key_value_heads,
                    config.head_dim, model.lm_head.weight.dtype, device)
    free_blocks = list(range(num_blocks - 1, -1, -1))
    generator = torch.Generator(device=device).manual_seed(seed)
    waiting = list(range(len(prompts) - 1, -1, -1))  # pop() takes prompts in order
    running: list[Completion] = []

    while waiting or running:
        prefills: list[Completion] = []
        budget = max_prefill_tokens
        while waiting and len(running) + len(prefills) < max_batch:
            index = waiting[-1]
            if prefills and len(prompts[index]) > budget:
                break
            waiting.pop()
            need = -(-(len(prompts[index]) + max_new_tokens) // BLOCK_SIZE)
            seq = Completion(index, list(prompts[index]), temperature=temperatures[index],
                             blocks=[free_blocks.pop() for _ in range(need)])
            prefills.append(seq)
            budget -= len(seq.prompt_ids)
        batch = prefills + running
        # Prefills feed their whole prompt; decoders feed their newest token.
        step_ids = [s.prompt_ids for s in prefills] + [[s.output_ids[-1]] for s in running]
        query_lens = [len(ids) for ids in step_ids]
        seq_lens = [s.num_tokens for s in batch]
        metadata = build_metadata(query_lens, seq_lens, [s.blocks for s in batch], BLOCK_SIZE,
                                  num_prefills=len(prefills), device=device)
        positions = torch.tensor([p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)],
                                 device=device)
        input_ids = torch.tensor([t for ids in step_ids for t in ids], device=device)
        last_rows = torch.tensor(query_lens, device=device).cumsum(0) - 1
        logits, hidden = model(input_ids, positions, TorchAttention(metadata, cache), logits_rows=last_rows)
        tokens = _pick(logits.float(), torch.tensor([s.temperature for s in batch], device=device), generator)
        last_hidden = hidden[last_rows].to(hidden_dtype).cpu() if keep_hidden else None

        running = []
        for row, (seq, token) in enumerate(zip(batch, tokens.tolist())):
            seq.output_ids.append(token)
            if last_hidden is not None:
                seq.hidden.append(last_hidden[row])
            if token in stop_ids or len(seq.output_ids) >= max_new_tokens:
                free_blocks.extend(seq.blocks)
                seq.blocks = []
                yield seq
            else:
                running.append(seq)
        if on_token:
            on_token(len(batch))


def _pick(logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """logits [N, V], temperatures [N] -> token ids [N]; temperature 0 is greedy."""
    greedy = logits.argmax(-1)
    sampled_rows = temperatures > 0
    if not bool(sampled_rows.any()):
        return greedy
    probs = (logits[sampled_rows] / temperatures[sampled_rows, None]).softmax(-1)
    greedy[sampled_rows] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return greedy
