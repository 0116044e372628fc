"""Draft vocabulary: heads that guess among a subset of tokens give the same guesses as a
full-vocabulary top-k restricted to that subset; it round-trips through Gorgon's format."""
import pytest
import torch
from safetensors.torch import load_file

from models.config import ModelConfig
from models.head_checkpoint import load_heads, save_heads
from models.heads import HeadsConfig, MedusaHeads

HIDDEN, VOCAB = 16, 40
BASE = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)
ACCURACIES = [[0.5 * 0.5 ** r for r in range(10)]] * 2


def heads_and_unembedding(seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(2, 1, HIDDEN, VOCAB, shared_unembedding=True))
    for p in heads.parameters():
        p.data.normal_()
    return heads, torch.nn.Linear(HIDDEN, VOCAB, bias=False)


def test_guesses_are_the_full_top_k_restricted_to_the_draft_vocab():
    heads, lm_head = heads_and_unembedding()
    vocab = torch.tensor([31, 2, 7, 8, 19, 23, 38, 0, 11])
    x = torch.randn(6, HIDDEN)
    full = heads.guesses(x, lm_head, 3)
    assert torch.equal(full, heads.logits(heads(x), lm_head).topk(3, dim=-1).indices)
    heads.set_draft_vocab(vocab)
    restricted = heads.guesses(x, lm_head, 3)
    logits = heads.logits(heads(x), lm_head)
    mask = torch.full((VOCAB,), float("-inf"))
    mask[vocab] = 0
    assert torch.equal(restricted, (logits + mask).topk(3, dim=-1).indices)
    assert set(restricted.flatten().tolist()) <= set(vocab.tolist())
    # their probabilities: the heads' softmax over the draft vocabulary
    probs, ids = heads.top_guesses(heads(x), lm_head, 3)
    assert torch.equal(ids, restricted)
    expected = (logits + mask).softmax(-1).gather(-1, restricted)
    assert torch.allclose(probs, expected, atol=1e-6)
    heads.set_draft_vocab(None)
    probs, ids = heads.top_guesses(heads(x), lm_head, 3)
    assert torch.allclose(probs, logits.softmax(-1).gather(-1, ids), atol=1e-6)


def test_draft_unembedding_follows_a_new_base_weight():
    heads, lm_head = heads_and_unembedding()
    heads.set_draft_vocab(torch.arange(0, VOCAB, 2))
    x = torch.randn(4, HIDDEN)
    heads.guesses(x, lm_head, 2)
    other = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    heads_full = heads.logits(heads(x), other) + torch.tensor([0.0, float("-inf")] * (VOCAB // 2))
    assert torch.equal(heads.guesses(x, other, 2), heads_full.topk(2, dim=-1).indices)


def test_draft_vocab_round_trips(tmp_path):
    heads, lm_head = heads_and_unembedding()
    heads.set_draft_vocab(torch.tensor([5, 3, 9, 3, 12]))
    meta = save_heads(tmp_path, heads, ACCURACIES, "tiny", "")
    assert meta["draft_vocab_size"] == 4
    stored = load_file(str(tmp_path / "heads.safetensors"))["draft_vocab"]
    assert stored.dtype == torch.int32 and stored.tolist() == [3, 5, 9, 12]
    loaded = load_heads(tmp_path, BASE).heads
    assert loaded.draft_vocab.tolist() == [3, 5, 9, 12]
    x = torch.randn(3, HIDDEN)
    assert torch.equal(loaded.guesses(x, lm_head, 2), heads.guesses(x, lm_head, 2))


@pytest.mark.parametrize("ids", [[-1, 3], [3, VOCAB], []])
def test_draft_vocab_outside_the_vocabulary_is_refused(ids):
    heads, _ = heads_and_unembedding()
    with pytest.raises(ValueError, match="draft vocabulary"):
        heads.set_draft_vocab(torch.tensor(ids, dtype=torch.long))


def test_heads_with_their_own_unembedding_take_no_draft_vocab():
    heads = MedusaHeads(HeadsConfig(2, 1, HIDDEN, VOCAB, shared_unembedding=False))
    with pytest.raises(ValueError, match="share"):
        heads.set_draft_vocab(torch.tensor([1, 2]))
