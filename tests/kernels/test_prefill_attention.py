"""The causal (chunked prefill) kernel against its plain-PyTorch reference and `TorchAttention`."""
import pytest
import torch

from batches import Batch, assert_close
from kernels.kv_cache import write_kv
from kernels.prefill_attention import prefill_attention, prefill_attention_reference
from models.attention import TorchAttention

HEADS = [(2, 2), (6, 2), (8, 1)]  # (query heads, kv heads): GQA ratios 1, 3 and 8


def check_prefill(batch: Batch, against_torch: bool = True) -> None:
    md, cache = batch.metadata, batch.cache
    k_cache, v_cache = cache.k[0], cache.v[0]
    write_kv(batch.k, batch.v, k_cache, v_cache, md.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))  # poisoned: unwritten rows fail
    prefills = md.num_prefills
    prefill_attention(batch.q, k_cache, v_cache, out, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                      prefills, max(md.query_lens_host[:prefills]))
    rows = slice(0, md.num_prefill_tokens)
    reference = prefill_attention_reference(batch.q, k_cache, v_cache, md.block_tables, md.seq_lens,
                                            md.cu_seqlens_q, prefills)
    assert_close(out[rows], reference, batch.q.dtype)
    if against_torch:
        torch_out = TorchAttention(md, cache)(0, batch.q, batch.k, batch.v)
        assert_close(out[rows], torch_out[rows], batch.q.dtype)
    assert (out[batch.padding_rows] == 0).all(), "padding rows come out as zeros"
    assert out[md.num_prefill_tokens:].isnan().all(), "rows of other sequences are left alone"


def random_chunks(rng, num_seqs, max_chunk, max_prefix):
    query_lens = [rng.randint(1, max_chunk) for _ in range(num_seqs)]
    seq_lens = [q + rng.choice([0, rng.randint(1, max_prefix)]) for q in query_lens]
    return query_lens, seq_lens


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_chunks(rng, dtype, heads):
    query_lens, seq_lens = random_chunks(rng, 3, 40, 70)
    # A tree sequence after the prefills must stay untouched by this kernel.
    batch = Batch(query_lens + [3], seq_lens + [9], 3, *heads, 32, dtype, rng)
    check_prefill(batch)


def test_padding_rows(rng):
    # TorchAttention raises IndexError on a prefill with seq_len 0: compare with the reference only.
    batch = Batch([3, 2, 4], [5, 0, 4], 3, 6, 2, 16, torch.float32, rng)
    check_prefill(batch, against_torch=False)


def test_one_token_chunks_and_long_prompt(rng):
    batch = Batch([1, 1, 40], [1, 60, 230], 3, 6, 2, 64, torch.float16, rng, block_size=16)
    check_prefill(batch)


def test_bfloat16(rng):
    batch = Batch(*random_chunks(rng, 2, 30, 40), 2, 8, 2, 16, torch.bfloat16, rng)
    check_prefill(batch)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_random_sweep(rng, trial):
    heads = HEADS[trial % 3]
    dtype = [torch.float32, torch.float16, torch.bfloat16][trial % 3]
    batch = Batch(*random_chunks(rng, 4, 200, 300), 4, *heads, rng.choice([16, 64, 80]), dtype, rng,
                  block_size=rng.choice([8, 16, 32]))
    check_prefill(batch)
