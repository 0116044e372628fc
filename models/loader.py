"""Load a Llama-family model from a Hugging Face-style directory (config.json + safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.config import ModelConfig
from models.llama import LlamaForCausalLM, RotaryEmbedding
from models.packed_linear import can_pack, pack_linears

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Hugging Face's separate projections and the stacked ones the model multiplies by in one call
STACKED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def read_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --model must be a Hugging Face-style directory "
                                "with config.json, *.safetensors and tokenizer files")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} is not a valid model config ({e!r})") from e


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is corrupt or unreadable ({e}); download or convert it again") from e
    return state


def stack_projections(state: dict[str, torch.Tensor]) -> None:
    """Replace each layer's q/k/v (and gate/up) weights and biases by their concatenation, in
    place; a layer missing one of them keeps what it has (and fails the name check)."""
    for name in list(state):
        for stacked, parts in STACKED.items():
            if f".{parts[0]}." not in name:
                continue
            names = [name.replace(f".{parts[0]}.", f".{part}.") for part in parts]
            if all(n in state for n in names):
                state[name.replace(f".{parts[0]}.", f".{stacked}.")] = torch.cat([state.pop(n) for n in names])


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", pack: bool = True, panels: bool = True,
               quantized: bool = True, int8: bool = False) -> LlamaForCausalLM:
    """Build the model from a directory; every parameter must be present with its shape.

    On the CPU its linear layers are packed (models/packed_linear.py: our panel kernel where
    it runs, unless `panels` is False, else oneDNN; 4- and 8-bit panels for weights that are
    exactly Q4_1 / Q8_0 values unless `quantized` is False; with `int8`, those weights multiply
    activations rounded to 8 bits in integer arithmetic instead) unless `pack` is False; the
    unembedding keeps its dense weight (the heads and training read it).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    dtype = parse_dtype(dtype)
    state = {k: v for k, v in read_state_dict(model_dir).items() if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    stack_projections(state)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: p.shape for k, p in model.named_parameters(remove_duplicate=True)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights in {model_dir} do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (q/k/v_proj are read into qkv_proj, "
                         "gate/up_proj into gate_up_proj)")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(f"{name} has shape {tuple(state[name].shape)}, the config implies {tuple(shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config)  # its buffer was built on the meta device
    model = model.to(device).eval().requires_grad_(False)
    if pack and can_pack(device, dtype):
        pack_linears(model, keep_weights=("lm_head",), panels=panels, quantized=quantized, int8=int8)
        model.model.refresh_cpu_decoder()   # decode and tree steps' layers in one C++ call where they can
    elif int8:
        raise ValueError("8-bit integer linear layers run on the CPU in fp32 only (--dtype float32)")
    return model
