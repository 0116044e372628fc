"""The PyTorch paged attention backend against dense attention with explicit masks."""
import random

import pytest
import torch

from models.attention import KVCache, TorchAttention, build_metadata

BLOCK = 4


def random_tree_masks(n: int, rng: random.Random) -> list[int]:
    masks = [1]
    for i in range(1, n):
        masks.append(masks[rng.randrange(i)] | (1 << i))
    return masks


def dense_reference(q_seq, keys, values, visible):
    # q [q, Hq, D], keys [k, Hkv, D], visible [q, k] bool
    group = q_seq.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, 1).transpose(0, 1)
    v = values.repeat_interleave(group, 1).transpose(0, 1)
    scores = q_seq.transpose(0, 1) @ k.transpose(1, 2) / q_seq.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("seqs", [
    # (cached, new, kind): two prompt chunks (one with a cached prefix), then decode/tree steps
    [(0, 9, "prefill"), (5, 6, "prefill"), (10, 1, "tree"), (3, 7, "tree"), (17, 16, "tree")],
    [(13, 8, "tree")],                                              # a lone tree: the whole step is one group
    [(6, 1, "tree"), (9, 1, "tree"), (1, 1, "tree"), (22, 1, "tree")],   # plain decodes side by side
    [(0, 5, "prefill"), (4, 3, "tree"), (7, 3, "tree"), (2, 2, "tree")],  # equal trees, then a smaller one
])
def test_paged_batch_matches_dense(seqs):
    rng = random.Random(0)
    torch.manual_seed(0)
    hq, hkv, d = 6, 2, 8
    cache = KVCache(1, 64, BLOCK, hkv, d, torch.float32)
    free = list(range(64))
    rng.shuffle(free)
    tables, history, masks = [], [], []
    for cached, new, _ in seqs:
        blocks = [free.pop() for _ in range((cached + new + BLOCK - 1) // BLOCK)]
        tables.append(blocks)
        hist_k, hist_v = torch.randn(cached, hkv, d), torch.randn(cached, hkv, d)
        for i in range(cached):
            slot = blocks[i // BLOCK] * BLOCK + i % BLOCK
            cache.k[0].view(-1, hkv, d)[slot] = hist_k[i]
            cache.v[0].view(-1, hkv, d)[slot] = hist_v[i]
        history.append((hist_k, hist_v))
    masks = [random_tree_masks(new, rng) for cached, new, kind in seqs if kind == "tree"]
    metadata = build_metadata([n for _, n, _ in seqs], [c + n for c, n, _ in seqs], tables, BLOCK,
                              num_prefills=sum(kind == "prefill" for _, _, kind in seqs), tree_masks=masks)
    total = sum(n for _, n, _ in seqs)
    # views of one stacked projection, as the model passes them: strided rows
    qkv = torch.randn(total, hq + 2 * hkv, d)
    q, k, v = qkv.split((hq, hkv, hkv), dim=1)
    out = TorchAttention(metadata, cache)(0, q, k, v)

    row = 0
    tree = iter(masks)
    for (cached, new, kind), (hist_k, hist_v) in zip(seqs, history):
        keys = torch.cat([hist_k, k[row:row + new]])
        values = torch.cat([hist_v, v[row:row + new]])
        visible = torch.ones(new, cached + new, dtype=torch.bool)
        if kind == "prefill":
            visible[:, cached:] = torch.ones(new, new).tril().bool()
        else:
            words = next(tree)
            visible[:, cached:] = torch.tensor([[bool(w >> j & 1) for j in range(new)] for w in words])
        expected = dense_reference(q[row:row + new], keys, values, visible)
        torch.testing.assert_close(out[row:row + new], expected, atol=1e-5, rtol=1e-5)
        row += new


def test_padding_rows_write_nothing():
    cache = KVCache(1, 4, BLOCK, 1, 4, torch.float32)
    metadata = build_metadata([1], [1], [[2]], BLOCK, num_prefills=0)
    padded = metadata.__class__(**{**metadata.__dict__, "slot_mapping": torch.tensor([-1])})
    TorchAttention(padded, cache)(0, torch.randn(1, 1, 4), torch.ones(1, 1, 4), torch.ones(1, 1, 4))
    assert cache.k.abs().sum() == 0


def test_move_slots_compacts_every_layer():
    cache = KVCache(3, 2, BLOCK, 1, 2, torch.float32)
    cache.k.view(3, -1, 1, 2)[:, 5] = 7.0
    cache.move_slots(torch.tensor([5]), torch.tensor([1]))
    assert (cache.k.view(3, -1, 1, 2)[:, 1] == 7.0).all()


def test_padding_sequences_with_no_keys_give_zeros_and_leave_others_alone():
    torch.manual_seed(1)
    cache = KVCache(1, 4, BLOCK, 1, 4, torch.float32)
    # a padding prefill, a real decode step, a padding tree step
    metadata = build_metadata([2, 1, 1], [0, 1, 0], [[], [3], []], BLOCK, num_prefills=1)
    assert metadata.slot_mapping.tolist() == [-1, -1, 3 * BLOCK, -1]
    q, k, v = torch.randn(4, 1, 4), torch.randn(4, 1, 4), torch.randn(4, 1, 4)
    out = TorchAttention(metadata, cache)(0, q, k, v)
    assert out[[0, 1, 3]].abs().sum() == 0
    torch.testing.assert_close(out[2], v[2])  # a lone token attends to itself only
