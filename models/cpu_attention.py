"""The CPU attention backend: decode and tree queries through Gorgon's C++ kernel.

`CpuAttention` has `TorchAttention`'s interface (built once per step, called once per
layer). Prompt chunks keep PyTorch's SDPA (long causal runs, where it is fast); decode and
tree-verification queries go through `tree_attention` (models/csrc/tree_attention.cpp),
which reads keys and values in place through the block tables instead of gathering a
padded copy per layer and computes each query on its own, so a token verified in a tree
gets the bits it gets decoded alone. Without the compiled kernels, for another dtype or a
head size that is not a multiple of 8, it is exactly `TorchAttention`.
"""
from __future__ import annotations

import torch

from models.attention import AttentionMetadata, KVCache, TorchAttention
from models.cpu_kernels import cpu_kernels


class CpuAttention(TorchAttention):
    def __init__(self, metadata: AttentionMetadata, kv_cache: KVCache):
        pool = kv_cache.k
        runs = pool.dtype == torch.float32 and pool.device.type == "cpu" and pool.shape[-1] % 8 == 0
        self.kernels = cpu_kernels() if runs else None   # the kernel reads head dims in 8-float registers
        has_trees = metadata.num_prefills < metadata.num_seqs
        super().__init__(metadata, kv_cache, tree_groups=self.kernels is None or not has_trees)
        self.metadata = metadata
        self.has_trees = self.kernels is not None and has_trees
        # prompt chunks of no keys (padding) leave rows no group writes: those start at zero
        self.zero_first = any(n == 0 for n in metadata.seq_lens_host[:metadata.num_prefills])

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> output [T, Hq, D]; writes k and v to the cache."""
        if not self.has_trees:
            return super().__call__(layer, q, k, v)
        self.write(layer, k, v)
        q = q.contiguous()
        out = torch.zeros_like(q) if self.zero_first else torch.empty_like(q)
        md = self.metadata
        self.kernels.tree_attention(out, q, self.kv_cache.k[layer], self.kv_cache.v[layer], md.block_tables,
                                    md.seq_lens, md.cu_seqlens_q, md.tree_mask, md.num_prefills,
                                    md.num_prefill_tokens, q.shape[-1] ** -0.5)
        return self.attend_groups(layer, q, out) if self.groups else out
