"""Engine configuration: one dataclass, validated once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str | None = None          # Hugging Face-style directory; None = the default model
    heads: str | None = None          # head checkpoint; None = the shipped heads; "none" = no heads
    speculation: bool = True          # False: plain one-token-per-step decoding, same engine
    tree_budget: int | None = None    # fixed tree size (nodes); None = adaptive to load
    max_tree_nodes: int = 64
    lookup_tokens: int = 16           # longest lookup chain added to a tree (0: none)
    datastore: str | None = None      # answers to draft chains from; None = the heads' own; "none" = off
    dtype: str = "float32"
    int8_linear: bool = False         # CPU: 4/8-bit weights times activations rounded to 8 bits (not exact fp32)
    device: str = "auto"              # auto = cuda when available, else cpu
    attention_backend: str = "auto"   # auto | torch | triton
    cuda_graphs: bool = True          # CUDA + triton: decode and tree steps (and drafts) replayed from CUDA graphs
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None = the model's own limit
    max_num_batched_tokens: int = 512
    max_queue_size: int = 256         # waiting requests beyond this are refused (HTTP 503)
    block_size: int = 16
    prefix_caching: bool = True       # full blocks of a finished or running prefix serve later requests
    kv_cache_memory_gb: float = 1.0
    kv_cache_dtype: str = "auto"      # auto = the model's dtype; float16 beside a float32 model (CPU): half the memory
    seed: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue_size", "block_size", "max_tree_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_tree_nodes <= 64:
            raise ValueError(f"max_tree_nodes must be between 1 and 64, got {self.max_tree_nodes}")
        if self.tree_budget is not None and not 1 <= self.tree_budget <= self.max_tree_nodes:
            raise ValueError(f"tree_budget must be between 1 and {self.max_tree_nodes}, got {self.tree_budget}")
        if not 0 <= self.lookup_tokens <= 64:
            raise ValueError(f"lookup_tokens must be between 0 and 64, got {self.lookup_tokens}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be positive")
        if self.max_num_batched_tokens < self.max_tree_nodes:
            raise ValueError("max_num_batched_tokens must hold at least one full tree (max_tree_nodes)")
        if self.kv_cache_dtype not in ("auto", self.dtype) and (
                self.kv_cache_dtype not in ("float16", "fp16") or self.dtype not in ("float32", "fp32")):
            raise ValueError(f"kv_cache_dtype must be auto or, beside a float32 model, float16; got "
                             f"{self.kv_cache_dtype!r} with dtype {self.dtype!r}")
        if self.int8_linear and self.dtype not in ("float32", "fp32"):
            raise ValueError("int8_linear rounds fp32 activations: it needs dtype float32")
        if self.int8_linear and self.attention_backend != "auto":
            raise ValueError("int8_linear keeps speculation exact only with the batch-invariant CPU attention: "
                             "it needs attention_backend auto")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
