"""Paged KV-cache writes: scatter a step's new keys/values to their slots, and move rows.

`write_kv` is vLLM's `reshape_and_cache` idea: one program per token copies its key and value
rows ([num_kv_heads * head_dim] each) to `slot = block * block_size + offset`; padding rows
(slot -1) are skipped. `move_slots` compacts an accepted tree path (Medusa's "keep the
accepted candidate's keys"): rows are copied from `src` slots to `dst` slots in every layer.
Each program owns a column stripe of one layer's K and V pools and loads all of its source
rows, then (after a barrier across its warps) stores them, so overlapping src/dst sets
behave like `KVCache.move_slots` (gather, then scatter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    num_kv_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding row
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)
    # The cache's last dim is contiguous (asserted by the launcher); the input's too.
    cache_offs = ((slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_offset
                  + offs_h[:, None] * stride_cache_head + offs_d[None, :])
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_offs, k, mask=mask)
    tl.store(v_cache_ptr + cache_offs, v, mask=mask)


@triton.jit
def _move_slots_kernel(
    k_pool_ptr, v_pool_ptr, src_ptr, dst_ptr,
    stride_layer, stride_slot,
    num_moves, row_size,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)  # a whole pool can pass 2**31 elements
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    src = tl.load(src_ptr + offs_n, mask=offs_n < num_moves, other=-1).to(tl.int64)
    dst = tl.load(dst_ptr + offs_n, mask=offs_n < num_moves, other=-1).to(tl.int64)
    valid = (src >= 0) & (dst >= 0)  # -1 on either side: a padding pair
    mask = valid[:, None] & (offs_c[None, :] < row_size)
    src_offs = layer * stride_layer + src[:, None] * stride_slot + offs_c[None, :]  # [N, C]
    dst_offs = layer * stride_layer + dst[:, None] * stride_slot + offs_c[None, :]
    k_rows = tl.load(k_pool_ptr + src_offs, mask=mask)
    v_rows = tl.load(v_pool_ptr + src_offs, mask=mask)
    # A row can be one move's source and another's destination (accepting tree nodes 2 and 3
    # moves 2 -> 1 and 3 -> 2), and different warps hold different rows: every load must land
    # before any store. Without this barrier the H200 read moved rows (kernels.bench, 512 moves).
    tl.debug_barrier()
    tl.store(k_pool_ptr + dst_offs, k_rows, mask=mask)
    tl.store(v_pool_ptr + dst_offs, v_rows, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> k_cache, v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,), (k.shape, v.shape, slot_mapping.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert k.stride(2) == 1 and v.stride(2) == 1, "the head dim must be contiguous"
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert slot_mapping.dtype in (torch.int32, torch.int64)
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d,
    )


def move_slots(k_pool: torch.Tensor, v_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy rows src -> dst ([N] int) in every layer of k_pool, v_pool [L, num_blocks, block_size, Hkv, D]."""
    assert k_pool.shape == v_pool.shape and k_pool.dim() == 5, (k_pool.shape, v_pool.shape)
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.dtype == v_pool.dtype
    assert src.shape == dst.shape and src.dim() == 1, (src.shape, dst.shape)
    assert src.dtype in (torch.int32, torch.int64) and dst.dtype in (torch.int32, torch.int64)
    num_moves = src.numel()
    if num_moves == 0:
        return
    num_layers = k_pool.shape[0]
    row_size = k_pool.shape[3] * k_pool.shape[4]
    block_n = max(16, triton.next_power_of_2(num_moves))
    block_c = max(16, min(triton.next_power_of_2(row_size), 8192 // block_n))
    grid = (num_layers, triton.cdiv(row_size, block_c))
    _move_slots_kernel[grid](
        k_pool, v_pool, src, dst,
        k_pool.stride(0), k_pool.stride(2),
        num_moves, row_size,
        BLOCK_N=block_n, BLOCK_C=block_c,
    )


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain PyTorch `write_kv`."""
    rows = torch.nonzero(slot_mapping >= 0).squeeze(1)
    slots = slot_mapping[rows].long()
    k_cache.view(-1, *k.shape[1:])[slots] = k[rows]
    v_cache.view(-1, *v.shape[1:])[slots] = v[rows]


def move_slots_reference(k_pool, v_pool, src, dst) -> None:
    """Plain PyTorch `move_slots`: gather all sources, then scatter (pairs with a -1 skipped)."""
    keep = (src >= 0) & (dst >= 0)
    src, dst = src[keep].long(), dst[keep].long()
    for pool in (k_pool, v_pool):
        flat = pool.view(pool.shape[0], -1, *pool.shape[3:])
        flat[:, dst] = flat[:, src]
