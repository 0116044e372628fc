"""Linear layers with weights reordered once for oneDNN: fast small-batch inference on CPU.

A plain `nn.Linear` on the CPU goes through a GEMM that repacks its weight matrix on every
call. For the few rows of a decode or tree-verification step that repacking costs as much
as the multiplication: on a 2-core AVX2 machine a forward of the default model over 2
tokens took 1.6x one token, over 8 tokens 1.9x. oneDNN can reorder a weight into its own
blocked layout once (`mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing
pass uses); every later call then streams the weights once at memory bandwidth, and a step
of 8 tokens costs about 1.3x one token (docs/benchmarks.md). Inference only: the packed
copy is frozen and has no gradient.
"""
from __future__ import annotations

import torch
from torch import nn


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN packing applies to CPU weights in fp32 (bf16 only where the CPU does bf16 math)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b over a oneDNN-packed W; x may have any leading shape.

    `keep_weight` keeps the dense weight reachable as `.weight` (for a tied unembedding the
    embedding holds it anyway); otherwise only the packed copy stays in memory.
    """

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(module: nn.Module, keep_weights: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear inside `module` by a PackedLinear; returns how many.

    `keep_weights` names (as in named_modules) the layers whose dense weight other code
    still reads (e.g. "lm_head").
    """
    replaced = 0
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, PackedLinear(child, keep_weight=full in keep_weights))
                replaced += 1
    return replaced
