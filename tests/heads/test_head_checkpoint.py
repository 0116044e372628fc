"""Head checkpoints: Gorgon's format round-trips, Medusa's loads (.safetensors and .pt),
head counts come from the weights, and heads for another base model are refused."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.head_checkpoint import (HeadCheckpoint, load_heads, model_checksum, prior_accuracies,
                                    save_heads, save_medusa)
from models.heads import HeadsConfig, MedusaHeads

HIDDEN, VOCAB = 16, 40
BASE = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def random_heads(num_heads=3, num_layers=2, shared=True, seed=0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(num_heads, num_layers, HIDDEN, VOCAB, shared))
    for p in heads.parameters():
        p.data.normal_()
    return heads


def same_outputs(a: MedusaHeads, b: MedusaHeads, lm_head: torch.nn.Linear, atol=1e-6) -> bool:
    x = torch.randn(5, HIDDEN)
    return torch.allclose(a.logits(a(x), lm_head), b.logits(b(x), lm_head), atol=atol)


def accuracies(num_heads):
    return [[0.6 / (k + 1) * 0.5 ** r for r in range(10)] for k in range(num_heads)]


@pytest.mark.parametrize("shared", [True, False])
def test_gorgon_format_round_trips(tmp_path, shared):
    heads = random_heads(shared=shared)
    meta = save_heads(tmp_path, heads, accuracies(3), "tiny", "sha256:abc", dtype=torch.float32)
    loaded = load_heads(tmp_path, BASE)
    assert isinstance(loaded, HeadCheckpoint) and loaded.format == "gorgon-heads"
    assert loaded.heads.config == heads.config
    assert loaded.base_model == "tiny" and loaded.base_checksum == "sha256:abc"
    assert sum(loaded.accuracies, []) == pytest.approx(sum(accuracies(3), []), abs=1e-5)
    assert loaded.tree_paths == tuple(tuple(p) for p in meta["tree"]["paths"])
    assert len(loaded.tree_paths) == 63
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    assert same_outputs(heads, loaded.heads, lm_head)
    assert json.loads((tmp_path / "heads.json").read_text())["num_layers"] == 2


def test_gorgon_format_stores_fp16_by_default(tmp_path):
    save_heads(tmp_path, random_heads(), accuracies(3), "tiny", "")
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "heads.safetensors")).values())
    loaded = load_heads(tmp_path, BASE, dtype=torch.bfloat16)
    assert next(loaded.heads.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.heads.parameters())


@pytest.mark.parametrize("use_pt", [False, True])
def test_medusa_format_loads(tmp_path, use_pt):
    heads = random_heads(num_heads=3, num_layers=2, shared=False)
    save_medusa(tmp_path, heads, base_model="org/tiny", use_pt=use_pt)
    assert (tmp_path / ("medusa_lm_head.pt" if use_pt else "medusa_lm_head.safetensors")).exists()
    loaded = load_heads(tmp_path, BASE)
    assert loaded.format == "medusa" and loaded.base_model == "org/tiny"
    assert loaded.heads.config == heads.config
    assert same_outputs(heads, loaded.heads, torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    assert loaded.accuracies == prior_accuracies(3)  # no measurements: the documented prior
    assert loaded.tree_paths and all(len(p) <= 3 for p in loaded.tree_paths)


def test_medusa_keys_follow_the_reference_naming(tmp_path):
    save_medusa(tmp_path, random_heads(num_heads=2, num_layers=1, shared=False))
    keys = set(load_file(str(tmp_path / "medusa_lm_head.safetensors")))
    assert keys == {"0.0.linear.weight", "0.0.linear.bias", "0.1.weight",
                    "1.0.linear.weight", "1.0.linear.bias", "1.1.weight"}


def test_shared_heads_export_to_medusa_with_the_base_unembedding(tmp_path):
    heads = random_heads(num_heads=2, num_layers=1, shared=True)
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    save_medusa(tmp_path, heads, base_lm_head=lm_head.weight)
    loaded = load_heads(tmp_path, BASE)
    assert loaded.heads.lm_heads is not None and same_outputs(heads, loaded.heads, lm_head, atol=1e-5)


def test_head_and_layer_counts_come_from_the_weights_not_the_config(tmp_path):
    save_medusa(tmp_path, random_heads(num_heads=3, num_layers=2, shared=False))
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 5, "medusa_num_layers": 1, "base_model_name_or_path": "x"}))
    loaded = load_heads(tmp_path, BASE)
    assert loaded.heads.config.num_heads == 3 and loaded.heads.config.num_layers == 2


def test_medusa_keys_with_a_model_prefix_load(tmp_path):
    save_medusa(tmp_path, random_heads(num_heads=2, num_layers=1, shared=False))
    state = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    save_file({f"medusa_head.{k}": v for k, v in state.items()}, str(tmp_path / "medusa_lm_head.safetensors"))
    assert load_heads(tmp_path, BASE).heads.config.num_heads == 2


def test_incomplete_medusa_head_is_refused(tmp_path):
    save_medusa(tmp_path, random_heads(num_heads=2, num_layers=1, shared=False))
    state = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    del state["1.1.weight"]
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(ValueError, match="head 1 .* incomplete"):
        load_heads(tmp_path, BASE)


@pytest.mark.parametrize("field, value", [("hidden_size", 32), ("vocab_size", 41)])
@pytest.mark.parametrize("fmt", ["gorgon", "medusa"])
def test_heads_for_another_base_model_are_refused(tmp_path, field, value, fmt):
    heads = random_heads(shared=fmt == "gorgon")
    if fmt == "gorgon":
        save_heads(tmp_path, heads, accuracies(3), "tiny", "")
    else:
        save_medusa(tmp_path, heads)
    other = dataclasses.replace(BASE, **{field: value})
    with pytest.raises(ValueError, match="hidden size .* vocabulary .* base model has"):
        load_heads(tmp_path, other)


def test_a_directory_without_heads_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no head checkpoint"):
        load_heads(tmp_path, BASE)


def test_model_checksum_is_stable_and_sees_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE.to_hf()))
    save_file({"a.weight": torch.ones(3, 4), "b.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    first = model_checksum(tmp_path)
    assert first == model_checksum(tmp_path) and first.startswith("sha256:")
    save_file({"a.weight": torch.full((3, 4), 2.0), "b.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert model_checksum(tmp_path) != first


def test_model_checksum_ignores_config_keys_that_do_not_define_the_model(tmp_path):
    # A converter that writes one more key (as ours began to write attention_out_bias) must
    # not turn the shipped heads' base model into "another base model".
    save_file({"a.weight": torch.ones(3, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(BASE.to_hf()))
    first = model_checksum(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE.to_hf(), "new_flag": False, "model_max_length": 9}))
    assert model_checksum(tmp_path) == first
    # a value left to its default, or rope settings in transformers 5's rope_parameters
    implicit = {k: v for k, v in BASE.to_hf().items() if k not in ("head_dim", "rope_theta")}
    implicit["rope_parameters"] = {"rope_type": "default", "rope_theta": BASE.rope_theta}
    (tmp_path / "config.json").write_text(json.dumps(implicit))
    assert model_checksum(tmp_path) == first
    (tmp_path / "config.json").write_text(json.dumps({**BASE.to_hf(), "rope_theta": 1234.0}))
    assert model_checksum(tmp_path) != first


def test_shipped_heads_were_trained_for_the_default_model(model_dir):
    from models.head_checkpoint import DEFAULT_HEADS_DIR
    meta = json.loads((DEFAULT_HEADS_DIR / "heads.json").read_text())
    assert meta["base_checksum"] == model_checksum(model_dir)


def test_token_input_heads_round_trip_and_stay_out_of_medusa_format(tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(HeadsConfig(2, 1, HIDDEN, VOCAB, True, token_input=True))
    for p in heads.parameters():
        p.data.normal_()
    save_heads(tmp_path / "g", heads, accuracies(2), "tiny", "", dtype=torch.float32)
    loaded = load_heads(tmp_path / "g", BASE).heads
    assert loaded.config.token_input
    x, e = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    torch.testing.assert_close(loaded.logits(loaded(x, e), lm_head), heads.logits(heads(x, e), lm_head))
    with pytest.raises(ValueError, match="next token"):
        loaded(x)
    with pytest.raises(ValueError, match="Medusa's format"):
        save_medusa(tmp_path / "m", heads, base_lm_head=lm_head.weight)
