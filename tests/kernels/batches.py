"""Random paged batches for the kernel tests (imported by the test modules)."""
import random
from dataclasses import replace

import torch

from models.attention import KVCache, build_metadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def random_tree_masks(num_nodes: int, rng: random.Random) -> list[int]:
    """A random valid tree in topological order: node i's mask = its parent's mask | bit i."""
    masks: list[int] = []
    for i in range(num_nodes):
        parent = masks[rng.randrange(i)] if i else 0
        masks.append(parent | (1 << i))
    return masks


class Batch:
    """A random packed step: metadata, a randomly filled cache, and q/k/v for its tokens.

    Sequences with seq_len 0 are padding rows (slots -1, no blocks).
    """

    def __init__(self, query_lens, seq_lens, num_prefills, num_heads, num_kv_heads, head_dim, dtype,
                 rng: random.Random, block_size=8, num_layers=1, tree_masks=None):
        tables = []
        needed = sum(-(-s // block_size) for s in seq_lens)
        free = list(range(needed + 3))  # a few spare blocks that nobody owns
        rng.shuffle(free)
        for seq_len in seq_lens:
            tables.append([free.pop() for _ in range(-(-seq_len // block_size))])
        if tree_masks is None:
            tree_masks = [random_tree_masks(q, rng) for q in query_lens[num_prefills:]]
        # build_metadata needs a block for every slot it computes: give padding rows a fake
        # table, then mark their rows as padding (slot -1, no blocks).
        fake = [t if s else [0] * -(-q // block_size) for t, s, q in zip(tables, seq_lens, query_lens)]
        md = build_metadata(query_lens, [s or q for s, q in zip(seq_lens, query_lens)], fake,
                            block_size, num_prefills, tree_masks, device=DEVICE)
        padding_rows = torch.zeros(sum(query_lens), dtype=torch.bool, device=DEVICE)
        block_tables = md.block_tables.clone()
        for b, seq_len in enumerate(seq_lens):
            if seq_len == 0:
                padding_rows[sum(query_lens[:b]): sum(query_lens[: b + 1])] = True
                block_tables[b] = -1
        self.metadata = replace(
            md, slot_mapping=md.slot_mapping.masked_fill(padding_rows, -1), block_tables=block_tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), seq_lens_host=tuple(seq_lens))
        self.padding_rows = padding_rows
        self.cache = KVCache(num_layers, needed + 3, block_size, num_kv_heads, head_dim, dtype, DEVICE)
        self.cache.k.normal_()
        self.cache.v.normal_()
        num_tokens = sum(query_lens)
        self.q = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE).to(dtype)
        self.k = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        self.v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "unwritten (NaN-poisoned) or NaN elements in the output"
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
