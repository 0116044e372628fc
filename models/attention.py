"""Attention metadata, the paged KV-cache pool and the PyTorch attention backend.

One forward of the model runs over a *packed* batch: the tokens of every sequence laid end
to end. Causal (prefill) sequences come first, then tree sequences (decode steps and
speculative trees). Every new token's key and value are written to the cache slot named in
`slot_mapping`; attention then reads each sequence's keys through its block table. A query
of a causal sequence sees every key up to its own position; a query of a tree sequence sees
the sequence's cached history and, among the step's new tokens, those whose bit is set in
its `tree_mask` word (its ancestors and itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

PAD_SLOT = -1  # slot_mapping / block_tables sentinel: a padding row, nothing read or written
MAX_TREE_TOKENS = 64  # tree_mask is one int64 word per query token


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one step writes keys and values and which keys each query may see."""
    slot_mapping: torch.Tensor   # [T] int64: cache slot (block * block_size + offset); -1 = padding
    block_tables: torch.Tensor   # [B, max_blocks] int32: -1 past a sequence's blocks
    seq_lens: torch.Tensor       # [B] int32: keys of each sequence once this step's are written
    cu_seqlens_q: torch.Tensor   # [B + 1] int32: sequence b's queries are rows cu[b]:cu[b+1]
    num_prefills: int            # sequences [0, num_prefills) are causal, the rest trees
    tree_mask: torch.Tensor | None  # [T - num_prefill_tokens] int64: bit j = may see new token j
    # Host copies (plain lists), so the backends plan without device-to-host syncs.
    seq_lens_host: tuple[int, ...]
    query_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.query_lens_host[: self.num_prefills])

    @property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seqlen_k(self) -> int:
        return max(self.seq_lens_host, default=0)


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_prefills: int,
    tree_masks: list[list[int]] | None = None,
    positions: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Turn per-sequence Python lists into the step's metadata tensors.

    A sequence's new tokens occupy its key slots seq_len - query_len .. seq_len - 1 (tree
    tokens too: a node's cache slot is its index in the tree, its RoPE position its depth).
    `tree_masks[b]` holds, for each query of tree sequence b, the bitmask of the new tokens
    it may see (ancestors and itself); None means a causal chain.
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
    slots = slot_list(query_lens, seq_lens, block_tables, block_size)
    width = max((len(t) for t in block_tables), default=0)
    tables = [t + [PAD_SLOT] * (width - len(t)) for t in block_tables]
    cu = [0]
    for q_len in query_lens:
        cu.append(cu[-1] + q_len)
    tree_mask = None
    if num_prefills < len(query_lens):
        tree_mask = torch.tensor(tree_mask_words(query_lens[num_prefills:], tree_masks), dtype=torch.int64,
                                 device=device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device).reshape(len(tables), width),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        num_prefills=num_prefills,
        tree_mask=tree_mask,
        seq_lens_host=tuple(seq_lens),
        query_lens_host=tuple(query_lens),
    )


def slot_list(query_lens, seq_lens, block_tables, block_size: int) -> list[int]:
    """The cache slot of every new token, sequence by sequence (PAD_SLOT for a padding
    sequence, seq_len 0: its rows write nothing)."""
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        if s_len == 0:
            slots.extend([PAD_SLOT] * q_len)
            continue
        for index in range(s_len - q_len, s_len):
            slots.append(table[index // block_size] * block_size + index % block_size)
    return slots


def tree_mask_words(query_lens, tree_masks: list[list[int]] | None) -> list[int]:
    """Tree sequences' mask words in order, as int64 values (None or a None entry: a causal chain)."""
    words: list[int] = []
    for b, q_len in enumerate(query_lens):
        if q_len > MAX_TREE_TOKENS:
            raise ValueError(f"a tree holds at most {MAX_TREE_TOKENS} tokens, got {q_len}")
        mask = tree_masks[b] if tree_masks else None
        words.extend(mask if mask is not None else [(1 << (i + 1)) - 1 for i in range(q_len)])
    # bit 63 set reads as a negative int64: keep the two's complement value
    return [w - (1 << 64) if w >= 1 << 63 else w for w in words]


class KVCache:
    """One preallocated pool of key/value blocks for all layers; layers use views.

    `dtype` is the model's (what attention computes in); the pools may store another,
    `storage_dtype` (fp16 beside an fp32 model on the CPU: half the memory, read back exactly)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 storage_dtype: torch.dtype | None = None):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=storage_dtype or dtype, device=device)
        self.v = torch.zeros(shape, dtype=storage_dtype or dtype, device=device)
        self.dtype = dtype
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy keys and values from slots `src` to slots `dst` in every layer ([N] int64 each)."""
        for pool in (self.k, self.v):
            flat = pool.view(pool.shape[0], -1, *pool.shape[3:])
            flat[:, dst] = flat[:, src]


class _Group(NamedTuple):
    """Sequences attended to in one SDPA call, padded to the longest query and context."""
    rows: torch.Tensor          # [b, mq] packed query row of each (sequence, query); 0 where padding
    key_slots: torch.Tensor     # [b, mk] cache slot of each key
    bias: torch.Tensor | None   # [b, 1, mq, mk] additive mask (None: plain causal)
    flat: torch.Tensor          # real queries' indices into the [b * mq] output
    out_rows: torch.Tensor      # ... and their packed rows
    span: tuple[int, int] | None  # (first row, rows) when the queries are those rows, in order, unpadded


class TorchAttention:
    """Reference attention over the paged cache: gather keys by slot, then masked SDPA.

    Built once per step from the metadata (the gather indices and masks are shared by all
    layers), then called once per layer. A group whose queries are a run of packed rows
    without padding (a lone sequence, or equal-length trees side by side) reads and writes
    them as slices: no gather, and no scatter when it is the whole step.
    """

    def __init__(self, metadata: AttentionMetadata, kv_cache: KVCache, tree_groups: bool = True):
        """tree_groups=False: groups for the prefill sequences only (a subclass attends the trees)."""
        self.kv_cache = kv_cache
        device = metadata.slot_mapping.device
        slot_mapping = metadata.slot_mapping
        self.write_rows = torch.nonzero(slot_mapping != PAD_SLOT).squeeze(1)
        self.write_slots = slot_mapping[self.write_rows]
        self.write_all = len(self.write_rows) == len(slot_mapping)
        block_size = kv_cache.block_size
        tables = metadata.block_tables
        cu = [0]
        for q_len in metadata.query_lens_host:
            cu.append(cu[-1] + q_len)
        # Each group: (query rows [b, mq], key slots [b, mk], mask [b, 1, mq, mk], valid [b, mq]).
        self.groups = []
        prefills = range(metadata.num_prefills)
        trees = range(metadata.num_prefills, metadata.num_seqs)
        tree_offset = metadata.num_prefill_tokens
        for b in prefills:  # one group per prompt chunk: no padding waste on long prompts
            self.groups.append(self._group([b], metadata, cu, tables, block_size, tree_offset, device, kv_cache.dtype))
        # tree sequences are padded to the longest query of their group: bucket them by query
        # length (1, 2, 3-4, 5-8, ...) so one big tree does not pad a whole batch of decodes
        buckets: dict[int, list[int]] = {}
        for b in trees if tree_groups else ():
            buckets.setdefault((metadata.query_lens_host[b] - 1).bit_length(), []).append(b)
        for bucket in sorted(buckets):
            self.groups.append(self._group(buckets[bucket], metadata, cu, tables, block_size, tree_offset, device,
                                           kv_cache.dtype))
        self.num_tokens = cu[-1]

    @staticmethod
    def _group(seqs, metadata, cu, tables, block_size, tree_offset, device, dtype):
        q_lens = [metadata.query_lens_host[b] for b in seqs]
        k_lens = [metadata.seq_lens_host[b] for b in seqs]
        mq, mk = max(q_lens), max(max(k_lens), 1)  # mk >= 1: padding sequences see one dummy key
        qi = torch.arange(mq, device=device)
        ki = torch.arange(mk, device=device)
        starts = torch.tensor([cu[b] for b in seqs], device=device)
        q_len_t = torch.tensor(q_lens, device=device)
        k_len_t = torch.tensor(k_lens, device=device)
        valid = qi[None, :] < q_len_t[:, None]                            # [b, mq]
        rows = torch.where(valid, starts[:, None] + qi[None, :], 0)
        width = (mk + block_size - 1) // block_size
        blocks = tables[seqs][:, :width].long()
        blocks = F.pad(blocks, (0, width - blocks.shape[1]))  # padding sequences may have no blocks
        key_slots = (blocks[:, ki // block_size] * block_size + ki % block_size)
        key_valid = ki[None, :] < k_len_t[:, None]                        # [b, mk]
        key_slots = torch.where(key_valid, key_slots, 0)
        prefix = (k_len_t - q_len_t)[:, None, None]                        # [b, 1, 1]
        new_index = ki[None, None, :] - prefix                            # [b, 1, mk]
        if seqs[0] < metadata.num_prefills:
            visible = new_index <= qi[None, :, None]
        else:
            tree_rows = torch.where(valid, rows - tree_offset, 0)
            words = torch.where(valid, metadata.tree_mask[tree_rows], 0)
            bit = torch.bitwise_left_shift(torch.ones_like(new_index), new_index.clamp(0, 63))
            visible = (torch.bitwise_and(words[:, :, None], bit) != 0)
        mask = ((new_index < 0) | visible) & key_valid[:, None, :] & valid[:, :, None]
        mask[:, :, 0] |= ~(mask.any(-1))  # queries that see nothing see one key, so softmax stays finite
        valid = valid & (k_len_t > 0)[:, None]
        if len(seqs) == 1 and k_lens[0] == q_lens[0] and seqs[0] < metadata.num_prefills:
            bias = None  # a whole prompt at once: plain causal attention
        else:  # an additive mask: much faster than a boolean one in CPU SDPA with GQA
            bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)[:, None]
        # where each real query's output goes: flat index into [b * mq] -> packed row
        flat = torch.nonzero(valid.reshape(-1)).squeeze(1)
        first = cu[seqs[0]]
        run = all(q == mq for q in q_lens) and min(k_lens) > 0 and all(cu[b] == first + i * mq for i, b in enumerate(seqs))
        return _Group(rows, key_slots, bias, flat, rows.reshape(-1)[flat], (first, len(seqs) * mq) if run else None)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> output [T, Hq, D]; writes k and v to the cache."""
        self.write(layer, k, v)
        return self.attend_groups(layer, q)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The step's keys and values [T, Hkv, D] into their cache slots (padding rows skipped)."""
        k_cache = self.kv_cache.k[layer].view(-1, *k.shape[1:])
        v_cache = self.kv_cache.v[layer].view(-1, *v.shape[1:])
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)   # a no-op unless the cache stores another dtype
        # index_copy_ / index_select: a third of the time of indexing with a tensor on the CPU
        k_cache.index_copy_(0, self.write_slots, k if self.write_all else k.index_select(0, self.write_rows))
        v_cache.index_copy_(0, self.write_slots, v if self.write_all else v.index_select(0, self.write_rows))

    def attend_groups(self, layer: int, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Masked SDPA over each group; rows of no group stay zero (or as they are in `out`)."""
        k_cache = self.kv_cache.k[layer].view(-1, *self.kv_cache.k.shape[-2:])
        v_cache = self.kv_cache.v[layer].view(-1, *self.kv_cache.v.shape[-2:])
        given = out is not None
        scale = q.shape[-1] ** -0.5
        for group in self.groups:
            b, mq = group.rows.shape
            if group.span is not None:
                first, count = group.span
                qg = q[first:first + count].view(b, mq, *q.shape[1:]).transpose(1, 2)   # [b, Hq, mq, D]
            else:
                qg = q.index_select(0, group.rows.view(-1)).view(b, mq, *q.shape[1:]).transpose(1, 2)
            slots = group.key_slots.view(-1)
            kg = k_cache.index_select(0, slots).to(q.dtype).view(b, -1, *k_cache.shape[1:]).transpose(1, 2)
            vg = v_cache.index_select(0, slots).to(q.dtype).view(b, -1, *v_cache.shape[1:]).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.bias, is_causal=group.bias is None,
                                                scale=scale, enable_gqa=True)
            og = og.transpose(1, 2).reshape(-1, *q.shape[1:])              # [b * mq, Hq, D]
            if group.span == (0, self.num_tokens) and not given:
                return og   # the whole step in one group, in order
            if out is None:
                out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows of padding sequences stay zero
            if group.span is not None:
                out[first:first + count] = og
            else:
                out.index_copy_(0, group.out_rows, og.index_select(0, group.flat))
        return out if out is not None else torch.zeros(q.shape, dtype=q.dtype, device=q.device)
