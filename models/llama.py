"""The Llama architecture (also Mistral and Qwen2), with Hugging Face parameter names.

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP. Attention goes
through a per-step callable (`attn(layer, q, k, v) -> out`, see models/attention.py) that
owns the KV cache and the mask, so trees and paged caches plug in without touching this file.

Inside the decoder layers, submodules are called through `.forward`: nn.Module's `__call__`
(its hook machinery) costs a few us a call, 12 calls a layer: 2.5-3.5% of a batch-1 forward
of 1-4 tokens on a 2-core CPU (docs/benchmarks.md, twelfth session). Gorgon registers no
hooks on them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.cpu_kernels import cpu_kernels

Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(residual + x), residual + x), the sum in place in
        `residual` where our CPU kernel runs (one call adds and normalizes)."""
        kernels = None
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % 8 == 0 and x.is_contiguous():
            kernels = cpu_kernels()
        if kernels is not None and (residual is None or residual.is_contiguous()):
            if residual is None:
                return kernels.rms_norm(x.view(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
            return kernels.rms_norm(residual.view(-1, x.shape[-1]), self.weight, self.eps,
                                    x.view(-1, x.shape[-1])).view(x.shape), residual
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; the arithmetic below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with the config's rope scaling (linear or llama3)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, 1, head_dim]
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, head_dim]; rotate-half convention (Hugging Face layout)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rotate_heads(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads_total, head_dim] -> its first `heads` heads with the rotary embedding (in
    place in x where our CPU kernel runs: fp32, contiguous, head_dim a multiple of 16)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and x.shape[-1] % 16 == 0:
        kernels = cpu_kernels()
        if kernels is not None:
            kernels.rotary_(x, cos, sin, heads)
            return x[:, :heads]
    return apply_rotary(x[:, :heads], cos, sin)


class LlamaAttention(nn.Module):
    """Grouped-query attention; the query, key and value projections are one matmul
    (`qkv_proj`, stacked by the loader from Hugging Face's q_proj, k_proj and v_proj): one
    read of the input and one call instead of three, and rotary embeddings run on queries and
    keys together."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        stacked_heads = self.num_heads + 2 * self.num_kv_heads
        self.qkv_proj = nn.Linear(config.hidden_size, stacked_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size,
                                bias=config.attention_out_bias)

    def forward(self, x, cos, sin, attn: Attention) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj.forward(x).view(tokens, -1, self.head_dim)
        rotated = self.num_heads + self.num_kv_heads
        q, k = rotate_heads(qkv, rotated, cos, sin).split((self.num_heads, self.num_kv_heads), dim=1)
        out = attn(self.layer, q, k, qkv[:, rotated:])        # [T, num_heads, head_dim]
        return self.o_proj.forward(out.reshape(tokens, -1))


class LlamaMLP(nn.Module):
    """SwiGLU; the gate and up projections are one matmul (`gate_up_proj`, stacked by the loader)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        kernels = cpu_kernels() if gate_up.dtype == torch.float32 and gate_up.device.type == "cpu" else None
        if kernels is not None and gate_up.dim() == 2 and gate_up.shape[-1] % 16 == 0 and gate_up.is_contiguous():
            return self.down_proj.forward(kernels.silu_mul(gate_up))   # one pass instead of three operators
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        """(the previous layer's output, the residual stream before it) -> this layer's (the
        first layer gets (embeddings, None)); the residual additions fused with the norms."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.forward(x, residual)
        h, residual = self.post_attention_layernorm.forward(self.self_attn.forward(h, cos, sin, attn), residual)
        return self.mlp.forward(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.cpu_decoder = None   # the layers in one C++ call (models/cpu_decoder.py); refresh_cpu_decoder()

    def refresh_cpu_decoder(self) -> None:
        """Build the C++ decoder over the layers' current (packed) weights; None where it cannot run."""
        from models.cpu_decoder import build_cpu_decoder
        self.cpu_decoder = build_cpu_decoder(self)

    def forward(self, input_ids, positions, attn: Attention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        arguments = None   # decode and tree steps on the CPU kernels: the same calls, from C++
        if self.cpu_decoder is not None and hasattr(attn, "decoder_arguments"):
            arguments = attn.decoder_arguments()
        if arguments is not None:
            x, residual = self.cpu_decoder.forward(x, cos, sin, *arguments)
            return self.norm(x, residual)[0]
        residual = None
        for layer in self.layers:
            x, residual = layer.forward(x, residual, cos, sin, attn)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], attn) -> last hidden states [T, hidden]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Attention,
                logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [R, vocab] for `logits_rows` (all rows if None), hidden [T, hidden])."""
        hidden = self.model(input_ids, positions, attn)
        selected = hidden if logits_rows is None else hidden[logits_rows]
        return self.compute_logits(selected), hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
