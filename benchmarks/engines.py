"""Engines for side-by-side benchmark runs."""
from __future__ import annotations

import os

from server.config import EngineConfig
from server.engine import LLMEngine


def make_engine(config: EngineConfig, cpu_decoder: bool) -> LLMEngine:
    """An engine; with cpu_decoder False its layers run in Python (GORGON_CPU_DECODER=off
    while it loads and measures its step costs)."""
    saved = os.environ.get("GORGON_CPU_DECODER")
    os.environ["GORGON_CPU_DECODER"] = "auto" if cpu_decoder else "off"
    try:
        return LLMEngine(config)
    finally:
        if saved is None:
            del os.environ["GORGON_CPU_DECODER"]
        else:
            os.environ["GORGON_CPU_DECODER"] = saved
