"""The tree kernel against its plain-PyTorch reference and against `TorchAttention`."""
import pytest
import torch

from batches import Batch, assert_close
from kernels.kv_cache import write_kv
from kernels.tree_attention import tree_attention, tree_attention_reference
from models.attention import TorchAttention

HEADS = [(2, 2), (6, 2), (8, 1)]  # (query heads, kv heads): GQA ratios 1, 3 and 8


def run_tree_kernel(batch: Batch, num_splits: int | None = None) -> torch.Tensor:
    md = batch.metadata
    k_cache, v_cache = batch.cache.k[0], batch.cache.v[0]
    write_kv(batch.k, batch.v, k_cache, v_cache, md.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))  # poisoned: unwritten rows fail
    first = md.num_prefills
    tree_attention(batch.q, k_cache, v_cache, out, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                   md.tree_mask, first, md.num_seqs - first, md.num_prefill_tokens, md.tree_mask.numel(),
                   max(md.query_lens_host[first:]), max(md.seq_lens_host[first:]), num_splits=num_splits)
    return out


def check_tree(batch: Batch, num_splits: int | None = None) -> None:
    out = run_tree_kernel(batch, num_splits)
    md, cache = batch.metadata, batch.cache
    rows = slice(md.num_prefill_tokens, None)
    reference = tree_attention_reference(batch.q, cache.k[0], cache.v[0], md.block_tables, md.seq_lens,
                                         md.cu_seqlens_q, md.tree_mask, md.num_prefills,
                                         md.num_seqs - md.num_prefills, md.num_prefill_tokens)
    assert_close(out[rows], reference, batch.q.dtype)
    torch_out = TorchAttention(md, cache)(0, batch.q, batch.k, batch.v)
    assert_close(out[rows], torch_out[rows], batch.q.dtype)
    assert (out[batch.padding_rows] == 0).all(), "padding rows come out as zeros"


def random_tree_batch(rng, num_heads, num_kv_heads, dtype, num_seqs=3, max_nodes=12, max_prefix=90,
                      head_dim=32, padding=True):
    query_lens = [rng.randint(1, max_nodes) for _ in range(num_seqs)]
    seq_lens = [q + rng.randint(0, max_prefix) for q in query_lens]
    if padding:
        query_lens.insert(1, 1)
        seq_lens.insert(1, 0)
    return Batch(query_lens, seq_lens, 0, num_heads, num_kv_heads, head_dim, dtype, rng)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_trees(rng, dtype, heads, num_splits):
    # a split takes >= MIN_SPLIT_BLOCKS key blocks: several splits need several hundred keys
    check_tree(random_tree_batch(rng, *heads, dtype, max_prefix=90 if num_splits == 1 else 400), num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tree_of_64_nodes_after_prefill_rows(rng, dtype):
    # One prefill sequence ahead of the trees: tree rows and mask words start past its tokens.
    batch = Batch([5, 64, 2], [5, 64 + 21, 2 + 8], 1, 6, 2, 16, dtype, rng, block_size=16)
    check_tree(batch)


@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_with_long_context(rng, num_splits):
    batch = Batch([1, 1, 1], [300, 7, 1], 0, 8, 1, 64, torch.float32, rng)
    check_tree(batch, num_splits)


def test_bfloat16(rng):
    check_tree(random_tree_batch(rng, 6, 2, torch.bfloat16), num_splits=2)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_random_sweep(rng, trial):
    heads = HEADS[trial % 3]
    dtype = [torch.float32, torch.float16, torch.bfloat16][trial % 3]
    batch = random_tree_batch(rng, *heads, dtype, num_seqs=5, max_nodes=64, max_prefix=400,
                              head_dim=rng.choice([16, 64, 80]))
    check_tree(batch, num_splits=rng.choice([None, 1, 2, 5]))
