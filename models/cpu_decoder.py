"""All decoder layers of a decode or tree step in one C++ call on the CPU.

At batch 1 the Python between the kernels of models/llama.py's layers (about fifteen calls
a layer, with their views and checks) cost ~2 ms of a ~7 ms SmolLM2-135M step on a 2-core
CPU, as much as all its attention and norms (docs/benchmarks.md, thirteenth session).
`models/csrc/cpu_decoder.cpp` runs the same kernels with the same arguments in the same
order from C++, so a step gets the same bits, and releases the GIL meanwhile (the HTTP
thread runs while the engine computes).

`build_cpu_decoder(model)` makes one for a LlamaModel whose linear layers are all packed
for Gorgon's kernels (models/packed_linear.py; the loader does it after packing). The model
uses it for steps whose every query goes through the C++ attention kernel
(`CpuAttention.decoder_arguments`); other steps, and every other set-up, keep the Python
layers. GORGON_CPU_DECODER=off turns it off (A/B runs).
"""
from __future__ import annotations

import os

import torch

from models.cpu_kernels import cpu_kernels
from models.packed_linear import QUANTIZED_MAX_ROWS, PackedLinear


def build_cpu_decoder(model):
    """model: a LlamaModel -> the kernels' CpuDecoder over its layers, or None where the C++
    layers would not do what the Python ones do (weights not all on Gorgon's kernels, a shape
    those kernels leave to PyTorch, or GORGON_CPU_DECODER=off)."""
    choice = os.environ.get("GORGON_CPU_DECODER", "auto")
    if choice not in ("auto", "off"):
        raise ValueError(f"GORGON_CPU_DECODER must be auto or off, not {choice!r}")
    kernels = cpu_kernels()
    if choice == "off" or kernels is None or not len(model.layers):
        return None
    first = model.layers[0].self_attn
    heads, kv_heads, head_dim = first.num_heads, first.num_kv_heads, first.head_dim
    eps = model.layers[0].input_layernorm.eps
    specs, norms = [], []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            spec = linear.kernel_spec() if isinstance(linear, PackedLinear) else None
            if spec is None:
                return None
            specs.append(spec)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu" or norm.eps != eps:
                return None
            norms.append(norm.weight.detach().contiguous())
    # the shapes llama.py sends to the norm, rotary and SwiGLU kernels (else PyTorch's operators)
    hidden, gate_up = norms[0].shape[0], specs[2][-1]
    if hidden % 8 or head_dim % 16 or gate_up % 16:
        return None
    return kernels.CpuDecoder(specs, norms, eps, heads, kv_heads, head_dim, QUANTIZED_MAX_ROWS, head_dim ** -0.5)


def build_cpu_heads(heads, base_lm_head):
    """heads: independent MedusaHeads with a draft vocabulary, packed for Gorgon's kernels ->
    the kernels' CpuHeads (their draft in one C++ call: models/csrc/cpu_heads.cpp) and the
    draft vocabulary its indices point into; None where the Python heads must draft (chained
    or full-vocabulary heads, weights not all on the kernels, kernels without CpuHeads, or
    GORGON_CPU_DECODER=off)."""
    kernels = cpu_kernels()
    if (os.environ.get("GORGON_CPU_DECODER", "auto") == "off" or kernels is None or not hasattr(kernels, "CpuHeads")
            or heads.config.chained or heads.draft_vocab is None):
        return None
    unembedding, vocab = heads.draft_unembedding(base_lm_head)
    linears = [unembedding, *(heads.token_proj or ()), *(block.linear for head in heads.blocks for block in head)]
    specs = [linear.kernel_spec() if isinstance(linear, PackedLinear) else None for linear in linears]
    if None in specs:
        return None
    projections = len(heads.token_proj or ())
    return kernels.CpuHeads(specs[1:1 + projections], specs[1 + projections:], heads.config.num_layers, specs[0],
                            QUANTIZED_MAX_ROWS), vocab
