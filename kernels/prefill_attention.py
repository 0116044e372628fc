"""Causal attention for packed variable-length prompt chunks over the paged KV cache.

Chunked prefill: sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b + 1], the last
q_len of its seq_len keys; a query sees the whole cached prefix (the first seq_len - q_len
keys, read through the block table) and, causally, the chunk's keys up to its own.

Algorithm: FlashAttention-2 (Dao 2023): a tile of queries streams the keys block by block
with an online softmax (log2 domain, fp32 accumulators), so no score matrix is stored.
As in the tree kernel, grouped-query heads are packed into the rows of one tile (row =
query token x query head of one KV head's group), so each KV block is read once per group.
Keys past the tile's last query are never loaded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_tiles import (LOG2E, NEG_LARGE, attend_block, head_dim_class, load_kv_block, load_query_tile,
                                     uses_fp32_dot)


@triton.jit(do_not_specialize=["stride_bt"])  # the block tables' width changes step to step
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ko, stride_kh,
    stride_ot, stride_oh,
    stride_bt,
    num_kv_heads, head_dim, scale_log2,
    GROUP: tl.constexpr, QUERIES_PER_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    row_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - row_start
    if q_tile * QUERIES_PER_TILE >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)  # 0 for a padding row: no keys, the output is 0
    prefix_len = seq_len - q_len

    query, head, row_valid, row, offs_d, d_valid, q = load_query_tile(
        q_ptr, stride_qt, stride_qh, row_start, q_len, q_tile, kv_head, head_dim,
        GROUP, QUERIES_PER_TILE, BLOCK_M, BLOCK_D)                                # q [M, D]

    m_i = tl.full([BLOCK_M], NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_query = q_tile * QUERIES_PER_TILE
    last_query = tl.minimum(q_len, first_query + QUERIES_PER_TILE) - 1
    key_end = tl.minimum(seq_len, prefix_len + last_query + 1)
    # Whole blocks up to the tile's first query: visible to every row, no mask.
    open_end = tl.maximum(tl.minimum(key_end, prefix_len + first_query + 1), 0) // BLOCK_N * BLOCK_N
    for start_n in range(0, open_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_kv_block(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt, stride_kb, stride_ko,
                             stride_kh, kv_head, offs_n, offs_n < key_end, offs_d, d_valid, BLOCK_SIZE)  # [N, D]
        m_i, l_i, acc = attend_block(q, k, v, None, m_i, l_i, acc, scale_log2, DOT_FP32, False)
    # The diagonal: causal mask.
    for start_n in range(open_end, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_valid = offs_n < key_end
        k, v = load_kv_block(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt, stride_kb, stride_ko,
                             stride_kh, kv_head, offs_n, key_valid, offs_d, d_valid, BLOCK_SIZE)
        visible = key_valid[None, :] & (offs_n[None, :] - prefix_len <= query[:, None])
        m_i, l_i, acc = attend_block(q, k, v, visible, m_i, l_i, acc, scale_log2, DOT_FP32, True)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


# Row tile (most rows), key-block size, warps and pipeline stages by head dim (<= 64, larger),
# set from `python -m kernels.bench --sweep` on an H200 (2026-11-28, docs/benchmarks.md): the
# fastest of 16 for 1k queries after 8k keys (head dim 64: 2 stages, 0.118 against 0.121 ms
# with 3). For head dim 128 the winner, 128 x 128 tiles with 8 warps (0.387 ms), needs more
# shared memory than a block has with fp32 inputs; the runner-up, 64 x 64 with 4 warps (0.405
# ms, ~5% slower), fits every dtype.
TILES = {64: (64, 128, 4, 2), 128: (64, 64, 4, 2)}


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      num_seqs: int, max_query_len: int, scale: float | None = None) -> None:
    """Causal attention of sequences [0, num_seqs) into their rows of `out`.

    q, out [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (this step's keys
    already written); block_tables [B, max_blocks] int32 (-1 padded); seq_lens [B] int32;
    cu_seqlens_q [B + 1] int32. max_query_len (a host int) bounds those sequences' chunks.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0, (q.shape, k_cache.shape)
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype
    assert block_tables.dtype == seq_lens.dtype == cu_seqlens_q.dtype == torch.int32
    assert block_tables.stride(1) == 1
    if num_seqs == 0 or max_query_len == 0:
        return
    group = num_heads // num_kv_heads
    max_block_m, block_n, num_warps, num_stages = TILES[head_dim_class(head_dim)]
    block_m = max(16, min(max_block_m, triton.next_power_of_2(max_query_len * group)))
    queries_per_tile = max(1, block_m // group)
    block_m = max(16, triton.next_power_of_2(queries_per_tile * group))  # group > block: one query
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_fp32 = uses_fp32_dot(q.dtype)
    grid = (triton.cdiv(max_query_len, queries_per_tile), num_seqs, num_kv_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        num_kv_heads, head_dim, (head_dim ** -0.5 if scale is None else scale) * LOG2E,
        GROUP=group, QUERIES_PER_TILE=queries_per_tile, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_FP32=dot_fp32, num_warps=num_warps, num_stages=num_stages,
    )


def prefill_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, num_seqs,
                                scale=None) -> torch.Tensor:
    """Plain PyTorch, one sequence at a time in fp32: the rows of sequences [0, num_seqs)."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    group = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    out = torch.zeros(cu[num_seqs], *q.shape[1:], dtype=q.dtype, device=q.device)
    for b in range(num_seqs):
        q_len, seq_len = cu[b + 1] - cu[b], int(seq_lens[b])
        if q_len == 0 or seq_len == 0:
            continue
        positions = torch.arange(seq_len, device=q.device)
        slots = block_tables[b].long()[positions // block_size] * block_size + positions % block_size
        keys = k_cache.flatten(0, 1)[slots].float().repeat_interleave(group, 1)     # [S, Hq, D]
        values = v_cache.flatten(0, 1)[slots].float().repeat_interleave(group, 1)
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = positions[None, :] <= query_pos[:, None]                           # [Q, S]
        scores = torch.einsum("qhd,khd->hqk", q[cu[b]:cu[b + 1]].float(), keys) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
