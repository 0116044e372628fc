"""`TritonAttention` against `TorchAttention` on mixed steps, and the backend choice."""
import pytest
import torch

from batches import Batch, assert_close
from kernels.backend import TritonAttention, attention_backend
from models.attention import KVCache, TorchAttention
from models.cpu_attention import CpuAttention


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_step_matches_torch_backend(rng, dtype, stacked, monkeypatch):
    """stacked: q, k and v are views of one [T, Hq + 2 Hkv, D] projection, as the model passes them."""
    # Two prompt chunks (one with a cached prefix), then a decode row, two trees and a padding row.
    query_lens = [9, 4, 1, 7, 1, 12]
    seq_lens = [9, 30, 41, 7 + 50, 0, 12 + 3]
    batch = Batch(query_lens, seq_lens, 2, 6, 2, 32, dtype, rng, num_layers=2)
    expected = KVCache(2, *batch.cache.k.shape[1:4], 32, dtype, batch.q.device)
    expected.k.copy_(batch.cache.k)
    expected.v.copy_(batch.cache.v)
    md = batch.metadata
    # Poison the backend's output buffer: every element it leaves unwritten reads NaN.
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x: real_empty_like(x).fill_(float("nan")))
    triton_attention, torch_attention = TritonAttention(md, batch.cache), TorchAttention(md, expected)
    for layer in range(2):
        q, k, v = (x * (layer + 1) for x in (batch.q, batch.k, batch.v))
        if stacked:
            q, k, v = torch.cat((q, k, v), dim=1).split((q.shape[1], k.shape[1], v.shape[1]), dim=1)
        out = triton_attention(layer, q, k, v)
        reference = torch_attention(layer, q, k, v)
        assert_close(out, reference, dtype)
    assert torch.equal(batch.cache.k, expected.k) and torch.equal(batch.cache.v, expected.v)


def test_backend_choice(monkeypatch):
    assert attention_backend("torch", "cpu") is TorchAttention
    assert attention_backend("auto", "cpu") is CpuAttention   # PyTorch's where the C++ kernels do not run
    assert attention_backend("auto", "cuda") is TritonAttention
    assert attention_backend("triton", "cuda") is TritonAttention
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_backend("triton", "cpu") is TritonAttention
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_backend("flash", "cpu")
