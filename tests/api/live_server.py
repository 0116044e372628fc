"""Settings of the real server that tests/api/conftest.py starts, and helpers to read it."""
from __future__ import annotations

import re

API_KEY = "sk-gorgon-test"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
MAX_QUEUE_SIZE = 32


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (`name{labels} value`); 0 when absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{[^}]*\})?") + r" (\S+)"
    values = [float(m.group(m.lastindex)) for m in re.finditer("^" + pattern + "$", text, re.MULTILINE)]
    return sum(values)
