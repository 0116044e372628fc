"""Linear layers with weights laid out once for fast small-batch inference on the CPU.

A decode or tree-verification step multiplies a few rows by every weight matrix, so its
time is the weights' trip from memory. A plain `nn.Linear` on the CPU goes through a GEMM
that repacks its weight matrix on every call; for a few rows that costs as much as the
multiplication. Two layouts, chosen once per process:

- **panels** (x86-64 with AVX2 and FMA, the default there): our kernel
  (`models/csrc/panel_linear.cpp`, built by models/cpu_kernels.py) over weights stored as
  16-column panels. It reads the weights at memory bandwidth for 1 to 6 rows (one pass
  over each panel; more rows take further passes from cache) and is as fast as oneDNN for
  hundreds (docs/benchmarks.md), and a row's result does not depend on how many rows share
  the call: a plain step and a speculative tree get the same bits for the same token.
- **oneDNN** (elsewhere, with GORGON_CPU_KERNELS=off, or if the kernels cannot be built):
  `mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing pass uses.

Inference only: the packed copy is frozen and has no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.cpu_kernels import cpu_kernels

PANEL = 16  # output columns per panel (models/csrc/panel_linear.cpp)


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Packing applies to CPU weights in fp32 (bf16 only where the CPU does bf16 math)."""
    if torch.device(device).type != "cpu":
        return False
    if dtype == torch.float32 and cpu_kernels() is not None:
        return True
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> [ceil(N / 16), K, 16]: panel p holds output columns 16p..16p+15, zero-padded."""
    n, k = weight.shape
    count = -(-n // PANEL)
    padded = F.pad(weight.detach().float(), (0, 0, 0, count * PANEL - n))
    return padded.view(count, PANEL, k).transpose(1, 2).contiguous()


class PackedLinear(nn.Module):
    """y = x W^T + b over W packed once (panels or oneDNN); x may have any leading shape.

    `keep_weight` keeps the dense weight reachable as `.weight` (for a tied unembedding the
    embedding holds it anyway); otherwise only the packed copy stays in memory.
    """

    def __init__(self, linear: nn.Linear, keep_weight: bool = False, panels: bool = True):
        """panels=False: oneDNN even where the panel kernel runs (for side-by-side benchmarks)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.kernels = cpu_kernels() if panels and weight.dtype == torch.float32 else None
        self.packed = _panels(weight) if self.kernels is not None else torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if self.kernels is not None:
            out = self.kernels.panel_linear(rows, self.packed, self.bias, self.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = "panels" if self.kernels is not None else "oneDNN"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={layout}"


def pack_linears(module: nn.Module, keep_weights: tuple[str, ...] = (), panels: bool = True) -> int:
    """Replace every nn.Linear inside `module` by a PackedLinear; returns how many.

    `keep_weights` names (as in named_modules) the layers whose dense weight other code
    still reads (e.g. "lm_head").
    """
    replaced = 0
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, PackedLinear(child, full in keep_weights, panels))
                replaced += 1
    return replaced
