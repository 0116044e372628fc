"""Kernel tests run in Triton's interpreter on machines without CUDA."""
import os
import random
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

# The repository root (for `models`, `kernels`) and this folder (for `batches`).
for path in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pytest  # noqa: E402


@pytest.fixture
def rng(request) -> random.Random:
    torch.manual_seed(0)
    return random.Random(request.node.name)
