"""Tree-verification (decode) attention over the paged KV cache.

Each tree sequence's queries (1..64 new tokens: a decode step or a Medusa candidate tree,
Cai et al. 2024) attend to the sequence's cached prefix, read through its block table, and to
those new tokens whose bit is set in the query's `tree_mask` word (its ancestors and itself).

Algorithm: FlashAttention's online softmax (Dao et al. 2022) in the log2 domain with fp32
accumulation. Grouped-query attention is packed as in vLLM's and FlashInfer's decode
kernels: one program handles one KV head and a tile of rows (query token x query head of
that KV head's group), so each key/value block is loaded once for the whole group and the
whole tree. For long contexts with few programs the keys are split across programs as in
Flash-Decoding (Dao, Haziza, Massa, Sizov 2023): each split writes a normalised partial
output and its log-sum-exp, and a second kernel merges the splits.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.attention_tiles import (LOG2E, NEG_LARGE, attend_block, head_dim_class, load_kv_block, load_query_tile,
                                     uses_fp32_dot)


# Integer arguments whose divisibility changes from step to step (batch layout) are not
# specialised on: each distinct specialisation is a compile, and a server must not compile
# while it serves. The partial output's strides (rows x heads x head dim) keep theirs, and
# with them vectorised access.
@triton.jit(do_not_specialize=["stride_ls", "stride_bt", "first_seq", "tree_row_offset", "num_splits"])
def _tree_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, tree_mask_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ko, stride_kh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    stride_bt,
    first_seq, tree_row_offset, num_kv_heads, head_dim, num_splits, scale_log2,
    GROUP: tl.constexpr, QUERIES_PER_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MIN_SPLIT_BLOCKS: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    kv_head = tl.program_id(1) % num_kv_heads
    q_tile = tl.program_id(1) // num_kv_heads
    split = tl.program_id(2)
    row_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - row_start
    if q_tile * QUERIES_PER_TILE >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)  # 0 for a padding row: no keys, the output is 0
    prefix_len = seq_len - q_len

    query, head, row_valid, row, offs_d, d_valid, q = load_query_tile(
        q_ptr, stride_qt, stride_qh, row_start, q_len, q_tile, kv_head, head_dim,
        GROUP, QUERIES_PER_TILE, BLOCK_M, BLOCK_D)                                # q [M, D]
    words = tl.load(tree_mask_ptr + row - tree_row_offset, mask=row_valid, other=0)  # [M] int64

    m_i = tl.full([BLOCK_M], NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # This sequence's share of keys for each split: whole blocks, at least MIN_SPLIT_BLOCKS
    # (a short sequence leaves the last splits empty; the merge weighs them 0). Computed here,
    # not passed in, so a CUDA graph's launch fits any context length.
    keys_per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits), MIN_SPLIT_BLOCKS) * BLOCK_N
    key_start = split * keys_per_split
    key_end = tl.minimum(seq_len, key_start + keys_per_split)
    # Whole blocks of cached history: every row sees every key, no mask.
    history_end = key_start + tl.maximum(tl.minimum(key_end, prefix_len) - key_start, 0) // BLOCK_N * BLOCK_N
    for start_n in range(key_start, history_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_kv_block(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt, stride_kb, stride_ko,
                             stride_kh, kv_head, offs_n, offs_n < key_end, offs_d, d_valid, BLOCK_SIZE)  # [N, D]
        m_i, l_i, acc = attend_block(q, k, v, None, m_i, l_i, acc, scale_log2, DOT_FP32, False)
    # The rest: a partial block of history, then the tree's own keys under its mask.
    for start_n in range(history_end, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_valid = offs_n < key_end
        k, v = load_kv_block(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt, stride_kb, stride_ko,
                             stride_kh, kv_head, offs_n, key_valid, offs_d, d_valid, BLOCK_SIZE)
        # New token j = offs_n - prefix_len is visible if bit j of the query's word is set.
        new_index = offs_n - prefix_len
        bit = (words[:, None] >> tl.maximum(new_index, 0).to(tl.int64)[None, :]) & 1
        visible = key_valid[None, :] & ((new_index[None, :] < 0) | (bit != 0))
        m_i, l_i, acc = attend_block(q, k, v, visible, m_i, l_i, acc, scale_log2, DOT_FP32, True)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = row_valid[:, None] & d_valid[None, :]
    if SPLIT:  # partial results, rows numbered from the first tree token
        out_row = row - tree_row_offset
        tl.store(out_ptr + split * stride_os + out_row[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), NEG_LARGE)
        tl.store(lse_ptr + split * stride_ls + out_row * stride_lt + head, lse, mask=row_valid)
    else:
        tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["stride_ls", "tree_row_offset", "num_splits"])
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_ot, stride_oh,
    tree_row_offset, num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)  # counted from the first tree token
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    lse = tl.load(lse_ptr + offs_s * stride_ls + token * stride_lt + head, mask=s_valid, other=NEG_LARGE)
    weight = tl.where(s_valid, tl.exp2(lse - tl.max(lse, 0)), 0.0)              # [S]
    partial = tl.load(partial_ptr + offs_s[:, None] * stride_ps + token * stride_pt + head * stride_ph
                      + offs_d[None, :], mask=s_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)              # [D]
    tl.store(out_ptr + (tree_row_offset + token) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)



# Most rows a tile, key-block size, warps and pipeline stages by head dim (<= 64, larger), set
# from `python -m kernels.bench --sweep` on an H200 (2026-11-28, docs/benchmarks.md: the
# fastest of 18 at batch 64 and 8k keys; 64-key blocks 1.24-1.36x faster than the 32-key
# ones before, 2 stages best for head dim 128). A 64-node tree of a group of 3 is 192 rows,
# but tiles of 128 or 256 rows (fewer re-reads of each key block) were slower.
TILES = {64: (64, 64, 4, 4), 128: (64, 64, 4, 2)}


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Fewest key blocks a split takes (fewer splits for shorter sequences).
MIN_SPLIT_BLOCKS = 4
# The most key splits; the merge kernel always reads this many slots (masked), so that a
# context growing through 2, 4, 8... splits compiles no new merge variant mid-request.
MAX_SPLITS = 64


def _choose_num_splits(device: torch.device, num_programs: int, max_seq_len: int | None, block_n: int) -> int:
    """Split the keys only when the grid would leave some multiprocessors idle (max_seq_len
    None: any context, as a CUDA graph's launch must fit)."""
    if device.type != "cuda":
        return 1
    num_sms = _num_sms(device)
    if num_programs >= num_sms:
        return 1
    by_occupancy = triton.cdiv(2 * num_sms, max(num_programs, 1))
    by_length = MAX_SPLITS if max_seq_len is None else triton.cdiv(max_seq_len, MIN_SPLIT_BLOCKS * block_n)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   tree_mask: torch.Tensor, first_seq: int, num_seqs: int, first_row: int,
                   num_rows: int, max_query_len: int, max_seq_len: int | None, scale: float | None = None,
                   num_splits: int | None = None) -> None:
    """Attention of tree sequences [first_seq, first_seq + num_seqs) into their rows of `out`.

    q, out [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    [B, max_blocks] int32 (-1 padded); seq_lens [B] int32; cu_seqlens_q [B + 1] int32;
    tree_mask [num_rows] int64, one word per query row from row `first_row` (=
    cu_seqlens_q[first_seq]) on. Host ints bound the sequences, so nothing syncs the device;
    max_seq_len None (a CUDA graph's capture) splits the keys for any context length.
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
    assert block_tables.stride(1) == 1 and tree_mask.dtype == torch.int64
    assert tree_mask.shape == (num_rows,) and first_row + num_rows <= num_tokens
    assert 1 <= max_query_len <= 64, "a tree holds 1 to 64 tokens"
    if num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    max_block_m, block_n, num_warps, num_stages = TILES[head_dim_class(head_dim)]
    block_m = max(16, min(max_block_m, triton.next_power_of_2(max_query_len * group)))
    queries_per_tile = max(1, block_m // group)
    block_m = max(16, triton.next_power_of_2(queries_per_tile * group))  # group > block: one query
    num_q_tiles = triton.cdiv(max_query_len, queries_per_tile)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits is None:
        num_splits = _choose_num_splits(q.device, num_seqs * num_kv_heads * num_q_tiles, max_seq_len, block_n)
    assert 1 <= num_splits <= MAX_SPLITS, num_splits
    scale_log2 = (head_dim ** -0.5 if scale is None else scale) * LOG2E
    grid = (num_seqs, num_kv_heads * num_q_tiles, num_splits)
    common = dict(GROUP=group, QUERIES_PER_TILE=queries_per_tile, BLOCK_SIZE=k_cache.shape[1],
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, MIN_SPLIT_BLOCKS=MIN_SPLIT_BLOCKS,
                  DOT_FP32=uses_fp32_dot(q.dtype), num_warps=num_warps, num_stages=num_stages)
    args = (block_tables, seq_lens, cu_seqlens_q, tree_mask,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    sizes = (block_tables.stride(0), first_seq, first_row, num_kv_heads, head_dim, num_splits, scale_log2)
    if num_splits == 1:
        _tree_attention_kernel[grid](q, k_cache, v_cache, out, out, *args,
                                     0, out.stride(0), out.stride(1), 0, 0, *sizes, SPLIT=False, **common)
        return
    partial = torch.empty(num_splits, num_rows, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_splits, num_rows, num_heads, dtype=torch.float32, device=q.device)
    _tree_attention_kernel[grid](q, k_cache, v_cache, partial, lse, *args,
                                 partial.stride(0), partial.stride(1), partial.stride(2),
                                 lse.stride(0), lse.stride(1), *sizes, SPLIT=True, **common)
    _merge_splits_kernel[(num_rows, num_heads)](
        partial, lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        first_row, num_splits, head_dim,
        BLOCK_S=MAX_SPLITS, BLOCK_D=block_d,
    )


def tree_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, tree_mask,
                             first_seq, num_seqs, first_row, scale=None) -> torch.Tensor:
    """Plain PyTorch, one sequence at a time in fp32: the rows of those sequences [rows, Hq, D]."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    group = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    cu = cu_seqlens_q.tolist()
    out = torch.zeros(cu[first_seq + num_seqs] - first_row, *q.shape[1:], dtype=q.dtype, device=q.device)
    for b in range(first_seq, first_seq + num_seqs):
        q_len, seq_len = cu[b + 1] - cu[b], int(seq_lens[b])
        if q_len == 0 or seq_len == 0:
            continue
        positions = torch.arange(seq_len, device=q.device)
        slots = block_tables[b].long()[positions // block_size] * block_size + positions % block_size
        keys = k_cache.flatten(0, 1)[slots].float().repeat_interleave(group, 1)     # [S, Hq, D]
        values = v_cache.flatten(0, 1)[slots].float().repeat_interleave(group, 1)
        words = tree_mask[cu[b] - first_row: cu[b + 1] - first_row]
        new_index = positions - (seq_len - q_len)
        bits = (words[:, None] >> new_index.clamp(0, 63)[None, :]) & 1
        visible = (new_index[None, :] < 0) | (bits != 0)                             # [Q, S]
        scores = torch.einsum("qhd,khd->hqk", q[cu[b]:cu[b + 1]].float(), keys) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[cu[b] - first_row: cu[b + 1] - first_row] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
