"""Everything the engine loads at start-up: model, tokenizer, heads, attention backend, costs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.attention import KVCache, TorchAttention, build_metadata
from models.heads import MedusaHeads
from models.llama import LlamaForCausalLM
from models.loader import load_model, parse_dtype
from models.tokenizer import Tokenizer
from server.config import EngineConfig
from server.cost_model import MEASURED_SIZES, StepCostModel

logger = logging.getLogger("gorgon.loading")


@dataclass(frozen=True)
class Components:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    heads: MedusaHeads | None
    tree_paths: tuple[tuple[int, ...], ...]
    accuracies: list[list[float]]
    attention_cls: type
    device: torch.device
    model_name: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def attention_class(name: str, device: torch.device) -> type:
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention
    from kernels.backend import attention_backend
    return attention_backend(name, device)


def load_components(config: EngineConfig, heads_override=None) -> Components:
    """Load the model and its heads. heads_override: an object with heads/tree_paths/accuracies."""
    device = resolve_device(config.device)
    dtype = parse_dtype(config.dtype)
    if config.model is None:
        from models.fetch import ensure_default_model
        model_dir = ensure_default_model()
    else:
        model_dir = Path(config.model)
    started = time.perf_counter()
    model = load_model(model_dir, dtype, device)
    tokenizer = Tokenizer(model_dir, model.config.eos_token_id)
    logger.info("loaded %s (%s) in %.1f s", model_dir, dtype, time.perf_counter() - started)
    checkpoint = heads_override
    if checkpoint is None and config.speculation and config.heads != "none":
        from models.head_checkpoint import DEFAULT_HEADS_DIR, load_heads, model_checksum
        checkpoint = load_heads(config.heads or DEFAULT_HEADS_DIR, model.config, dtype, device)
        if checkpoint.base_checksum and checkpoint.base_checksum != model_checksum(model_dir):
            logger.warning("the heads were trained for another base model (%s); they will guess poorly "
                           "but output stays exact", checkpoint.base_model)
    heads = checkpoint.heads.to(device=device, dtype=dtype).eval() if checkpoint is not None else None
    return Components(
        model=model, tokenizer=tokenizer, heads=heads,
        tree_paths=tuple(checkpoint.tree_paths) if checkpoint is not None else (),
        accuracies=list(checkpoint.accuracies) if checkpoint is not None else [],
        attention_cls=attention_class(config.attention_backend, device),
        device=device, model_name=Path(model_dir).name)


@torch.inference_mode()
def measure_step_costs(model: LlamaForCausalLM, kv_cache: KVCache, attention_cls: type,
                       max_tokens: int) -> StepCostModel:
    """Time a forward (with logits on every row, as a tree step has) at growing token counts."""
    sizes = [n for n in MEASURED_SIZES if n <= max_tokens]
    block_size = kv_cache.block_size
    num_blocks = min(kv_cache.num_blocks, (max(sizes) + block_size - 1) // block_size)
    table = list(range(num_blocks))
    measured = {}
    device = model.lm_head.weight.device
    for n in [sizes[0]] + sizes:  # the first size twice: the first forward warms up
        n = min(n, num_blocks * block_size)
        metadata = build_metadata([n], [n], [table], block_size, num_prefills=1, device=device)
        ids = torch.zeros(n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device)
        best = float("inf")
        for _ in range(1 if n > 64 else 3):  # best of 3: one noisy point would steer the policy for long
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(ids, positions, attention_cls(metadata, kv_cache))
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        measured[n] = best
    logger.info("step cost (tokens: ms): %s", ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in measured.items()))
    return StepCostModel(measured)
