"""The pieces both attention kernels share: the grouped-query row tile, a key/value block
read through the block table, and one online-softmax update.

A tile's rows are (query token x query head of one KV head's group), so each key/value
block is loaded once for the whole group. The softmax runs in the log2 domain with fp32
accumulators (FlashAttention, Dao et al. 2022); masked scores are a large finite negative,
so a fully masked row never computes inf - inf.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NEG_LARGE = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634


def head_dim_class(head_dim: int) -> int:
    """The key of a kernel's TILES table: 64 for head dims up to 64, else 128."""
    return 64 if head_dim <= 64 else 128


def uses_fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs, and bf16 under the interpreter (whose bf16 dot is wrong), take an exact fp32 dot."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr):
    # fp16/bf16 on a GPU use tensor cores with fp32 accumulation.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def load_query_tile(q_ptr, stride_qt, stride_qh, row_start, q_len, q_tile, kv_head, head_dim,
                    GROUP: tl.constexpr, QUERIES_PER_TILE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """-> (query index in the sequence [M], query head [M], row valid [M], packed row [M],
    head-dim offsets [D], head-dim valid [D], q [M, D])."""
    offs_m = tl.arange(0, BLOCK_M)
    query = q_tile * QUERIES_PER_TILE + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < QUERIES_PER_TILE * GROUP) & (query < q_len)
    row = row_start + query
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    return query, head, row_valid, row, offs_d, d_valid, q


@triton.jit
def load_kv_block(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt, stride_kb, stride_ko, stride_kh,
                  kv_head, offs_n, key_valid, offs_d, d_valid, BLOCK_SIZE: tl.constexpr):
    """Keys and values [N, D] of key positions offs_n of sequence `seq` (masked to zero).
    The cache's block size is a compile-time constant: a shift and a mask, not a division."""
    block = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
    kv_offs = block * stride_kb + (offs_n % BLOCK_SIZE) * stride_ko + kv_head * stride_kh
    kv_mask = key_valid[:, None] & d_valid[None, :]
    k = tl.load(k_cache_ptr + kv_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def attend_block(q, k, v, visible, m_i, l_i, acc, scale_log2, DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    """Fold one key block into the online softmax (m, l, acc): scores q k^T [M, N] in the
    log2 domain, then p v. MASKED=False: every key of the block is visible to every row
    (`visible` unused), so no mask arithmetic runs: the blocks before a tree or before a
    prompt tile's first query, which are nearly all of them at long context."""
    scores = dot(q, tl.trans(k), DOT_FP32) * scale_log2
    if MASKED:
        scores = tl.where(visible, scores, NEG_LARGE)
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    if MASKED:  # a row that has seen no key yet has m_new = NEG_LARGE: exp2(0) must not count
        p = tl.where(visible, p, 0.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_FP32)
    return m_new, l_i, acc
