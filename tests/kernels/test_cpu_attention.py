"""The CPU tree-attention kernel (models/csrc/tree_attention.cpp) against `TorchAttention`."""
import random

import pytest
import torch

from batches import DEVICE, Batch, assert_close, random_tree_masks
from models.attention import KVCache, TorchAttention, build_metadata
from models.cpu_attention import BatchInvariantCpuAttention, CpuAttention
from models.cpu_kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None or DEVICE != "cpu",
                                reason="the CPU kernels need an x86-64 CPU with AVX2 (tested on CPU runs)")
HEADS = [(2, 2), (6, 2), (8, 1)]  # (query heads, kv heads): GQA ratios 1, 3 and 8


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("seed", range(4))
def test_matches_torch_attention_on_random_batches(heads, head_dim, seed):
    """Prompt chunks (SDPA) and trees of 1-64 nodes (the kernel) in one step, partial blocks,
    histories up to a few hundred tokens, padding sequences."""
    rng = random.Random(seed)
    num_prefills = rng.randrange(3)
    query_lens = [rng.randrange(1, 20) for _ in range(num_prefills)]
    seq_lens = [q + rng.choice([0, rng.randrange(1, 40)]) for q in query_lens]
    for _ in range(rng.randrange(1, 6)):
        q = rng.choice([1, 1, rng.randrange(1, 65)])
        query_lens.append(q)
        seq_lens.append(0 if rng.random() < 0.15 else q + rng.randrange(0, 300))
    batch = Batch(query_lens, seq_lens, num_prefills, *heads, head_dim, torch.float32, rng)
    expected = TorchAttention(batch.metadata, batch.cache)(0, batch.q, batch.k, batch.v)
    attention = CpuAttention(batch.metadata, batch.cache)
    assert attention.has_trees
    assert_close(attention(0, batch.q, batch.k, batch.v), expected, torch.float32)


def fp16_copy(cache: KVCache) -> KVCache:
    """The cache's contents, stored in fp16 beside an fp32 model (--kv-cache-dtype float16)."""
    layers, blocks, block, kv_heads, head_dim = cache.k.shape
    half = KVCache(layers, blocks, block, kv_heads, head_dim, torch.float32, storage_dtype=torch.float16)
    half.k.copy_(cache.k)
    half.v.copy_(cache.v)
    return half


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("seed", range(2))
def test_fp16_cache_matches_torch_attention_over_it(heads, seed):
    """An fp16 cache is read back exactly and computed on in fp32: the kernel, SDPA over the
    same cache and the fp32 cache's result (within fp16's rounding of keys and values) agree."""
    rng = random.Random(seed)
    query_lens, seq_lens = [7, 1, 12, 3, 40], [20, 90, 12 + 250, 0, 40 + 17]
    batch = Batch(query_lens, seq_lens, 1, *heads, 64, torch.float32, rng)
    half = fp16_copy(batch.cache)
    expected = TorchAttention(batch.metadata, fp16_copy(batch.cache))(0, batch.q, batch.k, batch.v)
    attention = CpuAttention(batch.metadata, half)
    assert attention.has_trees
    out = attention(0, batch.q, batch.k, batch.v)
    assert_close(out, expected, torch.float32)
    assert half.k.dtype == torch.float16 and torch.equal(half.k[0].view(-1, *half.k.shape[3:])[
        batch.metadata.slot_mapping[batch.metadata.slot_mapping >= 0]], batch.k[~batch.padding_rows].half())
    torch.testing.assert_close(out, TorchAttention(batch.metadata, batch.cache)(0, batch.q, batch.k, batch.v),
                               atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("heads", HEADS)
def test_kernel_writes_every_tree_row_and_nothing_else(heads):
    rng = random.Random(7)
    batch = Batch([5, 1, 9, 3], [12, 40, 0, 70], 1, *heads, 64, torch.float32, rng)
    md = batch.metadata
    TorchAttention(md, batch.cache).write(0, batch.k, batch.v)
    out = torch.full_like(batch.q, float("nan"))  # poisoned
    cpu_kernels().tree_attention(out, batch.q, batch.cache.k[0], batch.cache.v[0], md.block_tables, md.seq_lens,
                                 md.cu_seqlens_q, md.tree_mask, md.num_prefills, md.num_prefill_tokens, 64 ** -0.5)
    assert out[:5].isnan().all()                       # the prompt chunk's rows are not the kernel's
    assert not out[5:].isnan().any()
    assert (out[6:15] == 0).all()                      # the padding sequence's rows are zero


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_a_tree_token_gets_the_bits_it_gets_decoded_alone(storage):
    """What makes speculative greedy decoding equal plain greedy decoding bit for bit: node i
    of a tree sees the history and its ancestors, in order, as the same token decoded alone
    after its ancestors does (over an fp32 or an fp16 cache)."""
    rng = random.Random(3)
    torch.manual_seed(3)
    hq, hkv, d, block, history, n = 6, 2, 64, 8, 37, 24
    masks = random_tree_masks(n, rng)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    hist_k, hist_v = torch.randn(history, hkv, d), torch.randn(history, hkv, d)

    def run(new_q, new_k, new_v, cached_k, cached_v, tree_masks):
        cache = KVCache(1, 16, block, hkv, d, torch.float32, storage_dtype=storage)
        table = list(range(15, 15 - 1 - (len(cached_k) + len(new_q)) // block, -1))   # scattered blocks
        slots = [table[i // block] * block + i % block for i in range(len(cached_k))]
        cache.k[0].view(-1, hkv, d)[slots] = cached_k.to(storage)
        cache.v[0].view(-1, hkv, d)[slots] = cached_v.to(storage)
        md = build_metadata([len(new_q)], [len(cached_k) + len(new_q)], [table], block, 0, [tree_masks])
        return CpuAttention(md, cache)(0, new_q, new_k, new_v)

    tree_out = run(q, k, v, hist_k, hist_v, masks)
    for node in rng.sample(range(n), 6):
        path = [j for j in range(n) if masks[node] >> j & 1]   # ancestors then the node, in order
        before = path[:-1]
        alone = run(q[node:node + 1], k[node:node + 1], v[node:node + 1],
                    torch.cat([hist_k, k[before]]), torch.cat([hist_v, v[before]]), [1])
        assert torch.equal(alone[0], tree_out[node])


def test_other_dtypes_use_torch_attention():
    cache = KVCache(1, 4, 8, 1, 8, torch.float64)
    md = build_metadata([1], [3], [[1]], 8, 0, [[1]])
    attention = CpuAttention(md, cache)
    assert not attention.has_trees and attention.groups


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("seed", range(3))
def test_batch_invariant_attention_matches_torch_attention(heads, seed):
    """Prompt chunks of up to 150 rows (runs of 64 through the kernel, a full 64-bit chain
    word included), with and without history, beside trees and padding sequences."""
    rng = random.Random(seed)
    query_lens = [rng.choice([64, 150, rng.randrange(1, 100)]), rng.randrange(1, 70), 5]
    seq_lens = [query_lens[0] + rng.choice([0, rng.randrange(1, 90)]), query_lens[1] + rng.randrange(0, 50), 0]
    for _ in range(rng.randrange(1, 4)):
        q = rng.randrange(1, 65)
        query_lens.append(q)
        seq_lens.append(q + rng.randrange(0, 200))
    batch = Batch(query_lens, seq_lens, 3, *heads, 64, torch.float32, rng)
    expected = TorchAttention(batch.metadata, batch.cache)(0, batch.q, batch.k, batch.v)
    attention = BatchInvariantCpuAttention(batch.metadata, batch.cache)
    assert attention.has_trees and not attention.groups   # every row through the kernel
    assert_close(attention(0, batch.q, batch.k, batch.v), expected, torch.float32)


def test_batch_invariant_prompt_rows_get_the_bits_of_any_chunking():
    """A prompt's rows through BatchInvariantCpuAttention: the same bits in one chunk, in
    chunks of other sizes, one token at a time (decode steps), and beside another prompt."""
    torch.manual_seed(5)
    hq, hkv, d, block, n = 6, 2, 64, 8, 150
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    table = list(range(30, 30 - 1 - n // block, -1))   # scattered blocks

    def run(chunks, neighbour=0, decode=False):
        cache = KVCache(1, 64, block, hkv, d, torch.float32)
        other = list(range(31, 31 + -(-neighbour // block)))
        outs, done = [], 0
        for size in chunks:
            lens, seqs, tables = [size], [done + size], [table]
            rows = slice(done, done + size)
            step_q, step_k, step_v = q[rows], k[rows], v[rows]
            if neighbour:   # another prompt in the same step, first
                lens, seqs, tables = [neighbour] + lens, [neighbour] + seqs, [other] + tables
                step_q, step_k, step_v = (torch.cat([torch.randn(neighbour, *t.shape[1:]), t])
                                          for t in (step_q, step_k, step_v))
            # decode: the target's rows as one-token tree steps, as the engine decodes
            md = build_metadata(lens, seqs, tables, block, len(lens) - decode, [[1]] if decode else None)
            outs.append(BatchInvariantCpuAttention(md, cache)(0, step_q, step_k, step_v)[-size:])
            done += size
        return torch.cat(outs)

    whole = run([n])
    assert_close(whole, TorchAttention(build_metadata([n], [n], [table], block, 1), KVCache(1, 64, block, hkv, d,
                 torch.float32))(0, q, k, v), torch.float32)
    for chunks, neighbour in (([37, 100, 13], 0), ([64, 64, 22], 0), ([n], 45), ([1] * n, 0)):
        assert torch.equal(run(chunks, neighbour), whole), (chunks, neighbour)
    assert torch.equal(run([1] * n, 20, decode=True), whole)
