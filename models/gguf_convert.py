"""Convert a Llama-family GGUF file into a Hugging Face-style directory we load fast.

The GGUF's quantized tensors are dequantized with the `gguf` package; llama.cpp stores the
Q and K projections with rows permuted for its RoPE layout, so they are un-permuted back to
Hugging Face's. The tokenizer and chat template come from `transformers`' GGUF reader.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models.config import ModelConfig

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-pair row order of a Q or K projection."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in LAYER_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    if stem not in GLOBAL_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{GLOBAL_NAMES[stem]}.{suffix}"


def read_config(reader) -> ModelConfig:
    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only llama-family GGUF files load")
    heads = field("llama.attention.head_count")
    hidden = field("llama.embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = field("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=field("llama.feed_forward_length"),
        num_hidden_layers=field("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field("llama.attention.head_count_kv", heads),
        head_dim=field("llama.rope.dimension_count", hidden // heads),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=field("llama.context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=(field("tokenizer.ggml.eos_token_id"),),
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into out_dir."""
    import gguf
    from transformers import AutoTokenizer

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises assorted errors on damaged files
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({e}); delete it and fetch again") from e
    config = read_config(reader)
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, config.num_key_value_heads)
        tensors[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
