"""The Triton attention backend and the choice between it and the PyTorch one.

`TritonAttention` has `TorchAttention`'s interface: built once per step from the metadata,
called once per layer. Each call writes the step's keys/values to the cache, runs the causal
kernel on the prefill sequences and the tree kernel on the rest, into one output. Triton is
imported only when a Triton backend is built, so the server imports without a GPU driver.
"""
from __future__ import annotations

import os

import torch

from models.attention import AttentionMetadata, KVCache, TorchAttention
from models.cpu_attention import CpuAttention

BACKEND_NAMES = ("auto", "torch", "triton")


class TritonAttention:
    """Paged attention with the kernels in this package (same interface as `TorchAttention`)."""

    def __init__(self, metadata: AttentionMetadata, kv_cache: KVCache,
                 graph_bucket: tuple[int, int, int] | None = None):
        """graph_bucket (sequences, longest tree, tokens): a step padded to a CUDA graph's
        bucket, whose launches the bucket fixes, fit for any context length
        (server/step_graphs.py); longest tree 0 marks a bucket of prompt chunks (of up to
        `tokens` each). The metadata's host copies are then not read."""
        from kernels import kv_cache as kv_kernels, prefill_attention, tree_attention

        self._write_kv = kv_kernels.write_kv
        self._prefill = prefill_attention.prefill_attention
        self._tree = tree_attention.tree_attention
        self.metadata = metadata
        self.kv_cache = kv_cache
        if graph_bucket is not None:
            num_seqs, longest_tree, num_tokens = graph_bucket
            prefill = longest_tree == 0
            self.num_prefills, self.max_prefill_query_len = (num_seqs, num_tokens) if prefill else (0, 0)
            self.num_trees, self.max_tree_query_len = (0, 0) if prefill else (num_seqs, longest_tree)
            self.first_tree_row, self.max_tree_seq_len = 0, None
            return
        # The plan, from host copies only: no device sync per step.
        num_prefills = metadata.num_prefills
        self.num_prefills = num_prefills
        self.num_trees = metadata.num_seqs - num_prefills
        self.first_tree_row = metadata.num_prefill_tokens
        self.max_prefill_query_len = max(metadata.query_lens_host[:num_prefills], default=0)
        self.max_tree_query_len = max(metadata.query_lens_host[num_prefills:], default=0)
        self.max_tree_seq_len = max(metadata.seq_lens_host[num_prefills:], default=0)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> output [T, Hq, D]; writes k and v to the cache."""
        md = self.metadata
        k_cache, v_cache = self.kv_cache.k[layer], self.kv_cache.v[layer]
        self._write_kv(k, v, k_cache, v_cache, md.slot_mapping)
        out = torch.empty_like(q)
        if self.num_prefills and self.max_prefill_query_len:
            self._prefill(q, k_cache, v_cache, out, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                          self.num_prefills, self.max_prefill_query_len)
        if self.num_trees and self.max_tree_query_len:
            self._tree(q, k_cache, v_cache, out, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                       md.tree_mask, self.num_prefills, self.num_trees, self.first_tree_row,
                       md.tree_mask.numel(), self.max_tree_query_len, self.max_tree_seq_len)
        return out


def attention_backend(name: str, device: torch.device | str) -> type:
    """The attention class for `name` ("auto", "torch" or "triton") on `device`.

    "auto" picks Triton on CUDA and, elsewhere, Gorgon's C++ kernel for decode and tree
    queries (models/cpu_attention.py; PyTorch where it cannot run). "torch" is the PyTorch
    reference everywhere. "triton" needs CUDA, or TRITON_INTERPRET=1 (Triton's CPU
    interpreter, slow: for tests).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    is_cuda = torch.device(device).type == "cuda"
    if name == "torch":
        return TorchAttention
    if name == "auto" and not is_cuda:
        return CpuAttention
    if not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton attention backend needs a CUDA device, got {device!r}: choose "
                         "the 'torch' (or 'auto') backend, or set TRITON_INTERPRET=1 to run the "
                         "kernels in Triton's slow CPU interpreter")
    return TritonAttention
