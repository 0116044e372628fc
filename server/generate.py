"""Reference autoregressive generation: one sequence, one token per forward.

This is the baseline that speculation is measured against and the oracle for exactness
tests. It uses the same model and attention backend as the engine, over a private KV cache
whose block table is simply 0, 1, 2, ...
"""
from __future__ import annotations

from typing import Iterator

import torch

from models.attention import KVCache, TorchAttention, build_metadata
from models.llama import LlamaForCausalLM
from server.logits_processor import Job, TokenCounts, changes_logits, process_logits
from server.sampler import make_generator, pick
from server.sampling_params import SamplingParams
from server.structured import Grammar

BLOCK_SIZE = 16


@torch.inference_mode()
def generate_stream(model: LlamaForCausalLM, prompt_ids: list[int], params: SamplingParams,
                    eos_token_ids: frozenset[int] = frozenset(), attention=TorchAttention,
                    kv_cache_dtype: torch.dtype | None = None, grammar: Grammar | None = None) -> Iterator[int]:
    """Yield generated token ids until EOS (unless ignored), max_tokens or, with a grammar
    (server/structured.py, for params.grammar), its completion (the KV cache in
    kv_cache_dtype, default the model's)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    config = model.config
    device = model.lm_head.weight.device
    total = len(prompt_ids) + params.max_tokens
    num_blocks = (total + BLOCK_SIZE - 1) // BLOCK_SIZE
    cache = KVCache(config.num_hidden_layers, num_blocks, BLOCK_SIZE, config.num_key_value_heads,
                    config.head_dim, model.lm_head.weight.dtype, device, storage_dtype=kv_cache_dtype)
    table = list(range(num_blocks))
    generator = make_generator(params, device)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))

    tokens = list(prompt_ids)
    counts = TokenCounts() if changes_logits(params) else None
    step_ids = tokens
    for _ in range(params.max_tokens):
        length = len(tokens)
        prefill = step_ids is tokens
        q_len = len(step_ids)
        metadata = build_metadata([q_len], [length], [table], BLOCK_SIZE,
                                  num_prefills=1 if prefill else 0, device=device)
        positions = torch.arange(length - q_len, length, device=device)
        input_ids = torch.tensor(step_ids, device=device)
        logits, _ = model(input_ids, positions, attention(metadata, cache),
                          logits_rows=torch.tensor([q_len - 1], device=device))
        if grammar is not None:
            grammar.mask(logits, [0], [()])
        if counts is not None:
            counts.update(prompt_ids, tokens, logits.shape[1], device)
            process_logits(logits, [Job([0], [()], params, counts, frozenset(stop_ids))])
        token = int(pick(logits, params, generator)[0])
        yield token
        if token in stop_ids or (grammar is not None and grammar.advance(token)):
            return
        tokens.append(token)
        step_ids = [token]


def generate(model: LlamaForCausalLM, prompt_ids: list[int], params: SamplingParams,
             eos_token_ids: frozenset[int] = frozenset(), attention=TorchAttention,
             kv_cache_dtype: torch.dtype | None = None, grammar: Grammar | None = None) -> list[int]:
    return list(generate_stream(model, prompt_ids, params, eos_token_ids, attention, kv_cache_dtype, grammar))
