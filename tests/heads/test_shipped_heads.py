"""The heads shipped for the default model load and guess real held-out continuations."""
import json
from pathlib import Path

import pytest
import torch

from models.attention import KVCache, TorchAttention, build_metadata
from models.head_checkpoint import DATASTORE_FILE, DEFAULT_HEADS_DIR, TREE_BUDGETS, load_heads
from models.head_trainer import evaluate, head_targets
from server.datastore import Datastore

HELD_OUT = Path(__file__).parent / "data" / "held_out_answers.json"
pytestmark = pytest.mark.skipif(not (DEFAULT_HEADS_DIR / "heads.json").exists(), reason="no shipped heads")


def test_shipped_heads_match_the_default_model(model, model_dir):
    checkpoint = load_heads(DEFAULT_HEADS_DIR, model.config)
    assert checkpoint.heads.config.num_heads == 4 and checkpoint.heads.config.num_layers == 2
    assert checkpoint.heads.lm_heads is None  # shared unembedding: a few MB
    assert checkpoint.heads.config.token_input
    assert 1000 < len(checkpoint.heads.draft_vocab) <= 4096
    assert (DEFAULT_HEADS_DIR / "heads.safetensors").stat().st_size < 8 << 20
    assert len(checkpoint.tree_paths) == 63 and checkpoint.tree_paths[0] == (0,)
    meta = json.loads((DEFAULT_HEADS_DIR / "heads.json").read_text())
    assert meta["base_model"] == model_dir.name
    lengths = [meta["tree"]["expected_accept_length"][str(b)] for b in TREE_BUDGETS]
    assert all(a < b for a, b in zip(lengths, lengths[1:]))


@torch.inference_mode()
def answer_hidden_states(model, prompt_ids, answer_ids) -> torch.Tensor:
    """One prefill over prompt + answer -> [len(answer), H]: row i produced answer token i."""
    ids = prompt_ids + answer_ids
    config = model.config
    blocks = -(-len(ids) // 16)
    cache = KVCache(config.num_hidden_layers, blocks, 16, config.num_key_value_heads, config.head_dim,
                    torch.float32)
    metadata = build_metadata([len(ids)], [len(ids)], [list(range(blocks))], 16, num_prefills=1)
    _, hidden = model(torch.tensor(ids), torch.arange(len(ids)), TorchAttention(metadata, cache),
                      logits_rows=torch.tensor([0]))
    return hidden[len(prompt_ids) - 1: len(ids) - 1]


def test_shipped_heads_guess_held_out_continuations(model, tokenizer):
    """Held-out answers of the training data (the model's own greedy tokens): head 1's top-1
    must be far above chance (1 / 49152); docs/heads.md has the full held-out figures."""
    checkpoint = load_heads(DEFAULT_HEADS_DIR, model.config)
    hidden, tokens, lengths = [], [], [0]
    for item in json.loads(HELD_OUT.read_text())["answers"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}])
        hidden.append(answer_hidden_states(model, prompt, item["answer_ids"]))
        tokens += item["answer_ids"]
        lengths.append(len(item["answer_ids"]))
    hidden, tokens = torch.cat(hidden), torch.tensor(tokens)
    # the fixture is what this model really says: its own argmax reproduces the tokens
    assert (model.compute_logits(hidden).argmax(-1) == tokens).float().mean() >= 0.95
    targets = head_targets(tokens, torch.tensor(lengths).cumsum(0), 4)
    next_embeds = model.model.embed_tokens(tokens) if checkpoint.heads.config.token_input else None
    accuracy = evaluate(checkpoint.heads, model.lm_head, hidden, targets, next_embeds)
    assert accuracy[0][0] >= 0.15
    assert sum(accuracy[0][:5]) >= accuracy[0][0] > accuracy[3][0] - 0.05


def test_shipped_datastore_drafts_held_out_continuations(model):
    """The datastore beside the shipped heads (the base model's answers to the training
    prompts, held-out ones left out) proposes chains for most positions of held-out answers,
    and their first token is often right (chance would be ~0)."""
    checkpoint = load_heads(DEFAULT_HEADS_DIR, model.config)
    assert checkpoint.datastore_path == DEFAULT_HEADS_DIR / DATASTORE_FILE
    assert checkpoint.datastore_path.stat().st_size < 4 << 20
    store = Datastore.load(checkpoint.datastore_path)
    assert 400_000 < store.num_tokens < 600_000 and store.max_match == 4
    proposed = right = positions = 0
    for item in json.loads(HELD_OUT.read_text())["answers"]:
        answer = item["answer_ids"]
        for t in range(2, len(answer) - 1):
            chain = store.continuation(answer[:t], 8)
            positions += 1
            proposed += bool(chain)
            right += bool(chain) and chain[0] == answer[t]
    assert proposed >= 0.5 * positions and right >= 0.3 * proposed
