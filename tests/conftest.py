"""Shared fixtures: the default model (fetched once into the model cache) and its tokenizer."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_dir():
    from models.fetch import ensure_default_model
    return ensure_default_model()


@pytest.fixture(scope="session")
def model(model_dir):
    from models.loader import load_model
    return load_model(model_dir, "float32")


@pytest.fixture(scope="session")
def tokenizer(model_dir, model):
    from models.tokenizer import Tokenizer
    return Tokenizer(model_dir, model.config.eos_token_id)


PRIOR_ACCURACIES = [[0.6, 0.1, 0.05, 0.03, 0.02], [0.4, 0.1, 0.05, 0.03], [0.3, 0.08, 0.04], [0.2, 0.06, 0.03]]


@pytest.fixture(scope="session")
def random_heads(model):
    """Untrained heads with random weights (they accept little) and a tree from prior accuracies."""
    from types import SimpleNamespace

    from models.heads import HeadsConfig, MedusaHeads
    from server.tree import expand_tree

    torch.manual_seed(1234)
    heads = MedusaHeads(HeadsConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return SimpleNamespace(heads=heads, tree_paths=tuple(expand_tree(PRIOR_ACCURACIES, 64)),
                           accuracies=PRIOR_ACCURACIES)
