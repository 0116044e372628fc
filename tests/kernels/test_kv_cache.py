"""The cache write and row-move kernels against their references and `KVCache.move_slots`."""
import pytest
import torch

from batches import DEVICE
from kernels.kv_cache import move_slots, move_slots_reference, write_kv, write_kv_reference
from models.attention import KVCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_skips_padding_slots(dtype):
    torch.manual_seed(0)
    cache = KVCache(2, 5, 4, 3, 20, dtype, DEVICE)
    cache.k.normal_()
    cache.v.normal_()
    expected_k, expected_v = cache.k.clone(), cache.v.clone()
    qkv = torch.randn(7, 9, 20, device=DEVICE).to(dtype)  # k and v as strided views of a qkv tensor
    k, v = qkv[:, 3:6], qkv[:, 6:9]
    slots = torch.tensor([3, -1, 7, 0, 19, -1, 10], device=DEVICE)
    write_kv(k, v, cache.k[1], cache.v[1], slots)
    write_kv_reference(k, v, expected_k[1], expected_v[1], slots)
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)


def test_write_kv_of_no_tokens_is_a_no_op():
    cache = KVCache(1, 2, 4, 1, 8, torch.float32, DEVICE)
    empty = torch.empty(0, 1, 8, device=DEVICE)
    write_kv(empty, empty, cache.k[0], cache.v[0], torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert not cache.k.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_move_slots_matches_kv_cache(dtype):
    # An accepted path 0 -> 2 -> 5 of a tree written at slots 10..15: compact to 10, 11, 12.
    # Source 12 is also a destination: every row must be read before any is written.
    torch.manual_seed(0)
    cache = KVCache(3, 6, 4, 2, 24, dtype, DEVICE)
    cache.k.normal_()
    cache.v.normal_()
    expected = KVCache(3, 6, 4, 2, 24, dtype, DEVICE)
    expected.k.copy_(cache.k)
    expected.v.copy_(cache.v)
    src = torch.tensor([10, 12, 15, 11], device=DEVICE)
    dst = torch.tensor([10, 11, 12, 13], device=DEVICE)
    move_slots(cache.k, cache.v, src, dst)
    expected.move_slots(src, dst)
    assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)


def test_move_slots_chained_moves_at_scale():
    # 512 moves where every destination but one is another move's source, rows of 8 x 128:
    # the rows of one program are spread over its warps (on a GPU this raced without a barrier).
    torch.manual_seed(0)
    cache = KVCache(4, 64, 16, 8, 128, torch.float16, DEVICE)
    cache.k.normal_()
    cache.v.normal_()
    expected = KVCache(4, 64, 16, 8, 128, torch.float16, DEVICE)
    expected.k.copy_(cache.k)
    expected.v.copy_(cache.v)
    slots = torch.randperm(64 * 16, device=DEVICE)[:513]
    src, dst = slots[1:], slots[:-1]  # move i writes where move i - 1 reads
    move_slots(cache.k, cache.v, src, dst)
    expected.move_slots(src, dst)
    assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)


def test_move_slots_skips_padding_pairs():
    torch.manual_seed(0)
    cache = KVCache(2, 40, 4, 3, 16, torch.float16, DEVICE)  # 160 slots, many moves
    cache.k.normal_()
    cache.v.normal_()
    expected_k, expected_v = cache.k.clone(), cache.v.clone()
    src = torch.randperm(160, device=DEVICE)[:70]
    dst = torch.randperm(160, device=DEVICE)[:70]
    src[::7] = -1
    dst[3::11] = -1
    move_slots(cache.k, cache.v, src, dst)
    move_slots_reference(expected_k, expected_v, src, dst)
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)
