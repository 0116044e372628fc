"""The CPU attention backend: decode and tree queries through Gorgon's C++ kernel.

`CpuAttention` has `TorchAttention`'s interface (built once per step, called once per
layer). Prompt chunks keep PyTorch's SDPA (long causal runs, where it is fast); decode and
tree-verification queries go through `tree_attention` (models/csrc/tree_attention.cpp),
which reads keys and values in place through the block tables instead of gathering a
padded copy per layer and computes each query on its own, so a token verified in a tree
gets the bits it gets decoded alone. It computes in fp32 over an fp32 or fp16 cache. Without
the compiled kernels, for another dtype or a head size that is not a multiple of 8, it is
exactly `TorchAttention`.
`BatchInvariantCpuAttention` sends prompt chunks through the kernel too.
"""
from __future__ import annotations

import torch

from models.attention import MAX_TREE_TOKENS, AttentionMetadata, KVCache, TorchAttention
from models.cpu_kernels import cpu_kernels


class CpuAttention(TorchAttention):
    prompts_through_kernel = False   # BatchInvariantCpuAttention: True

    def __init__(self, metadata: AttentionMetadata, kv_cache: KVCache):
        pool = kv_cache.k
        runs = (kv_cache.dtype == torch.float32 and pool.dtype in (torch.float32, torch.float16)
                and pool.device.type == "cpu" and pool.shape[-1] % 8 == 0)
        self.kernels = cpu_kernels() if runs else None   # the kernel reads head dims in 8-float registers
        if self.kernels is not None and self.prompts_through_kernel and metadata.num_prefills:
            metadata = prompt_runs_as_trees(metadata)
        has_trees = metadata.num_prefills < metadata.num_seqs
        super().__init__(metadata, kv_cache, tree_groups=self.kernels is None or not has_trees)
        self.metadata = metadata
        self.has_trees = self.kernels is not None and has_trees
        # prompt chunks of no keys (padding) leave rows no group writes: those start at zero
        self.zero_first = any(n == 0 for n in metadata.seq_lens_host[:metadata.num_prefills])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The step's keys and values into their cache slots: one kernel call (rounding to an
        fp16 cache on the way) where the kernels run, else TorchAttention's indexing."""
        heads_contiguous = all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v))
        if self.kernels is None or not heads_contiguous:
            return super().write(layer, k, v)
        self.kernels.write_kv(k, v, self.kv_cache.k[layer], self.kv_cache.v[layer], self.metadata.slot_mapping)

    def decoder_arguments(self) -> tuple | None:
        """The caches and metadata the C++ decoder (models/cpu_decoder.py) takes, when every
        query of the step goes through the kernel (no prompt chunk for SDPA); else None."""
        md = self.metadata
        if not self.has_trees or self.groups or md.num_prefills or self.zero_first:
            return None
        return (self.kv_cache.k, self.kv_cache.v, md.slot_mapping, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                md.tree_mask)

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


class BatchInvariantCpuAttention(CpuAttention):
    """CpuAttention with prompt chunks through the kernel too (prompt_runs_as_trees): every
    row's result is then a fixed function of the keys it sees, so a request's output does
    not depend on how its prompt was chunked or what else shared its steps, to the bit.
    Prompts cost more than through SDPA (a /tmp run, 8-bit integer linear layers: 300
    tokens 231 against 202 ms, 2,000 tokens 4.3 against 2.6 s). The engine uses it with
    --int8-linear, whose rounding of activations would turn a last-bit difference into a
    different token now and then."""
    prompts_through_kernel = True


def prompt_runs_as_trees(metadata: AttentionMetadata) -> AttentionMetadata:
    """The step's metadata with each prompt chunk cut into runs of at most MAX_TREE_TOKENS
    rows, each run a sequence of its own whose queries see the keys before the run and, in it,
    the rows up to their own (a chain). The kernel computes a query's result from the keys it
    sees, in order, whatever the split between cached history and new tokens, so every row
    gets the bits a decode step of that token gets: a prompt's keys and values, and the
    tokens after it, do not depend on how the prompt was chunked or what else the step held."""
    prefills, rows = metadata.num_prefills, metadata.num_prefill_tokens
    q_lens = torch.tensor(metadata.query_lens_host[:prefills])
    s_lens = torch.tensor(metadata.seq_lens_host[:prefills])
    seq = torch.repeat_interleave(torch.arange(prefills), q_lens)                 # each row's sequence
    index = torch.arange(rows) - (torch.cumsum(q_lens, 0) - q_lens)[seq]           # its place in its chunk
    offset = index % MAX_TREE_TOKENS                                               # its place in its run
    starts = torch.nonzero(offset == 0).squeeze(1)                                 # each run's first row
    run_lens = torch.diff(starts, append=torch.tensor([rows]))
    run_seq = seq[starts]
    ends = index[starts] + run_lens                                                # the chunk's rows to the run's end
    lens = torch.where(s_lens[run_seq] > 0, (s_lens - q_lens)[run_seq] + ends, 0)  # keys the run sees; 0: padding
    chain = torch.bitwise_left_shift(torch.ones(rows, dtype=torch.int64), offset + 1) - 1   # rows 0..offset
    chain = torch.where(offset == MAX_TREE_TOKENS - 1, -1, chain)  # all 64 bits: -1 in two's complement
    device = metadata.seq_lens.device
    tree_mask = chain.to(device)
    if metadata.tree_mask is not None:
        tree_mask = torch.cat([tree_mask, metadata.tree_mask])
    cu = torch.cat([starts, torch.tensor([rows])]).to(device=device, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=metadata.slot_mapping,
        block_tables=torch.cat([metadata.block_tables[run_seq.to(device)], metadata.block_tables[prefills:]]),
        seq_lens=torch.cat([lens.to(device=device, dtype=torch.int32), metadata.seq_lens[prefills:]]),
        cu_seqlens_q=torch.cat([cu, metadata.cu_seqlens_q[prefills + 1:]]),   # tree sequences keep their rows
        num_prefills=0, tree_mask=tree_mask,
        seq_lens_host=tuple(lens.tolist()) + metadata.seq_lens_host[prefills:],
        query_lens_host=tuple(run_lens.tolist()) + metadata.query_lens_host[prefills:])
