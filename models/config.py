"""The architecture of a Llama-family model, read once from a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # biases on q, k, v
    attention_out_bias: bool = False    # bias on o_proj (Llama's attention_bias; never in Qwen2)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config dict; refuse architectures we cannot run."""
        architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}: Gorgon runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; convert the model or pick another one")
        heads = hf["num_attention_heads"]
        # transformers 5 moves rope settings into `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        # Qwen2 always has q/k/v biases; Llama-style configs say so explicitly.
        qkv_bias = hf.get("attention_bias", architecture == "Qwen2ForCausalLM")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=qkv_bias,
            attention_out_bias=qkv_bias and architecture != "Qwen2ForCausalLM",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            architecture=architecture,
        )

    def to_hf(self) -> dict:
        """A Hugging Face-style config dict (what we write next to converted weights)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "architecture"}
        out["eos_token_id"] = list(self.eos_token_id)
        out["architectures"] = [self.architecture]
        out["model_type"] = {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}.get(
            self.architecture, "llama")
        return out
