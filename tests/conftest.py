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
