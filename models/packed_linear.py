"""Linear layers with weights laid out once for fast small-batch inference on the CPU.

A decode or tree-verification step multiplies a few rows by every weight matrix, so its
time is the weights' trip from memory. A plain `nn.Linear` on the CPU goes through a GEMM
that repacks its weight matrix on every call; for a few rows that costs as much as the
multiplication. The layouts, chosen once per process:

- **panels** (x86-64 with AVX2 and FMA, the default there): our kernel
  (`models/csrc/panel_linear.cpp`, built by models/cpu_kernels.py) over weights stored as
  16-column panels. It reads the weights at memory bandwidth for 1 to 6 rows (one pass
  over each panel; more rows take further passes from cache) and is as fast as oneDNN for
  hundreds (docs/benchmarks.md), and a row's result does not depend on how many rows share
  the call: a plain step and a speculative tree get the same bits for the same token.
- **4- and 8-bit panels** (the same kernel, where a weight matrix holds nothing but the
  values of GGUF's Q4_1 or Q8_0 dequantization: per block of 32 along k an fp16 step d (and
  for Q4_1 a minimum m), each weight d * code (+ m) in fp32; the default model comes from
  such a GGUF: Q4_1 layers, a Q8_0 embedding). `_q4_panels` / `_q8_panels` recover the
  scales and codes from the fp32 weights and keep them only if they rebuild every weight to
  the bit; the kernel dequantizes in registers with the same roundings, so it multiplies
  the very fp32 weights the fp32 panels hold and gives the same bits, from 6 or 9 bits a
  weight in memory instead of 32. They run calls of up to QUANTIZED_MAX_ROWS rows (a
  decode or a small tree: ~1.7-3x the fp32 panels' speed at 1 to 6 rows), the fp32 panels,
  kept beside them, the bigger ones (docs/benchmarks.md). Other matrices have fp32 panels only.
- **4/8-bit codes x 8-bit integers** (`int8=True`, the engine's --int8-linear; CPUs with
  AVX-512 VNNI): the same exact Q4_1 / Q8_0 codes, laid out for VPDPBUSD, times x rounded
  per row and block of 32 to 8 bits, in integer dot products (models/csrc/int8_linear.cpp):
  ~3x less compute a row, at every row count, but not the exact product. No fp32 panels
  are kept beside them. `round_to_q8_0` makes any weight such values (lossy: the heads).
- **oneDNN** (elsewhere, with GORGON_CPU_KERNELS=off, or if the kernels cannot be built):
  `mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing pass uses.

Inference only: the packed copy is frozen and has no gradient.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.cpu_kernels import cpu_kernels

PANEL = 16  # output columns per panel (models/csrc/panel_linear.cpp)
QBLOCK = 32  # k per block of codes sharing their scales (GGUF's Q4_1 and Q8_0)


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


def _by_panel(t: torch.Tensor) -> torch.Tensor:
    """[N, C] (a value per output column) -> [P, C, 16], zero-padded to whole panels."""
    n, c = t.shape
    count = -(-n // PANEL)
    return F.pad(t, (0, 0, 0, count * PANEL - n)).view(count, PANEL, c).transpose(1, 2)


def _block_codes(blocks: torch.Tensor, guess: torch.Tensor, low: torch.Tensor | None, limits: tuple[int, int]):
    """Blocks [N, B, 32] of weights -> (steps [N, B, 1], codes [N, B, 32]) with every weight
    d * code (+ low: two roundings) to the bit, d an fp16 value, or None. guess: each block's
    d rounded to fp16, tried with its two fp16 neighbours either way (what the quantizer's own
    rounding may have moved)."""
    offset = low if low is not None else torch.zeros_like(guess, dtype=torch.float32)
    bits = guess.half().view(torch.int16)
    step = torch.zeros_like(offset)
    codes = torch.zeros_like(blocks)
    found = torch.zeros(offset.shape, dtype=torch.bool)
    for delta in (0, -1, 1, -2, 2):
        d = (bits + delta).view(torch.float16).float()
        d = torch.where(torch.isfinite(d) & (d >= 0), d, torch.zeros_like(d))
        q = torch.where(d > 0, (blocks - offset) / d, torch.zeros_like(blocks)).round().clamp(*limits)
        rebuilt = d * q if low is None else d * q + low   # GGUF's dequantization, rounding by rounding
        match = (rebuilt.view(torch.int32) == blocks.view(torch.int32)).all(-1, keepdim=True) & ~found
        step, codes = torch.where(match, d, step), torch.where(match, q, codes)
        found |= match
        if found.all() or not found.any():   # done, or not such values at all
            break
    return (step, codes) if found.all() else None


def _q4_values(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """weight [N, K] -> (codes [N, K], steps [N, K / 32], minimums [N, K / 32]) of GGUF's Q4_1,
    or None unless every weight is d * code + m of its block of 32 (fp16 d and m, 4-bit
    codes) to the bit. A block's minimum is its code-0 weight, m; d is about (max - m) / 15."""
    n, k = weight.shape
    if k % QBLOCK:
        return None
    blocks = weight.detach().float().reshape(n, k // QBLOCK, QBLOCK)
    low = blocks.amin(-1, keepdim=True)
    found = _block_codes(blocks, (blocks.amax(-1, keepdim=True) - low) / 15, low, (0, 15))
    if found is None:
        return None
    step, codes = found
    return codes.to(torch.uint8).reshape(n, k), step.reshape(n, -1), low.reshape(n, -1)


def _q8_values(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """weight [N, K] -> (codes [N, K], steps [N, K / 32]) of GGUF's Q8_0, or None unless every
    weight is d * code of its block of 32 (fp16 d, 8-bit codes) to the bit. d is about the
    block's largest magnitude / 127."""
    n, k = weight.shape
    if k % QBLOCK:
        return None
    blocks = weight.detach().float().reshape(n, k // QBLOCK, QBLOCK)
    found = _block_codes(blocks, blocks.abs().amax(-1, keepdim=True) / 127, None, (-128, 127))
    if found is None:
        return None
    step, codes = found
    return codes.to(torch.int8).reshape(n, k), step.reshape(n, -1)


def _q4_scales(steps: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """[N, K / 32] steps and minimums -> [P, K / 32, 2, 16]: each panel's and block's d, then m."""
    return torch.stack([_by_panel(steps), _by_panel(mins)], dim=2).contiguous()


def _q4_panels(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 values -> the exact 4-bit panels (models/csrc/panel_linear.cpp): codes [P, K, 8]
    uint8 (byte j of row k: column j's code in the low nibble, column j + 8's in the high one)
    and scales [P, K / 32, 2, 16]."""
    codes = _by_panel(codes)                                                              # [P, K, 16]
    codes = (codes[..., :PANEL // 2] | (codes[..., PANEL // 2:] << 4)).contiguous()       # [P, K, 8]
    return codes, _q4_scales(steps, mins)


def _q8_panels(codes: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 values -> the exact 8-bit panels: codes [P, K, 16] int8, scales [P, K / 32, 16]."""
    return _by_panel(codes).contiguous(), _by_panel(steps).contiguous()


def _int8_groups(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> [P, K / 32, 8, 16, 4]: per panel, block and group of 4 k, column j's 4
    codes side by side (one int32 lane of VPDPBUSD each; models/csrc/int8_linear.cpp)."""
    n, k = codes.shape
    by_panel = _by_panel(codes)                                                  # [P, K, 16]
    return by_panel.view(len(by_panel), k // QBLOCK, 8, 4, PANEL).transpose(3, 4)


def _q4_int8_panels(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_1 values -> the 8-bit integer kernel's layout: codes [P, K / 32, 4, 64] uint8 (group
    pair h: groups 2h in the low nibbles, 2h + 1 in the high ones) and scales [P, K / 32, 2, 16]
    fp16 (GGUF's own fp16 values: no rounding)."""
    groups = _int8_groups(codes)
    packed = groups[:, :, 0::2] | (groups[:, :, 1::2] << 4)
    return packed.reshape(*packed.shape[:3], 4 * PANEL).contiguous(), _q4_scales(steps, mins).half()


def _q8_int8_panels(codes: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q8_0 values -> codes [P, K / 32, 8, 64] int8, scales [P, K / 32, 16] fp16 and each
    column's codes summed per block, [P, K / 32, 16] int16."""
    n, k = codes.shape
    sums = codes.reshape(n, k // QBLOCK, QBLOCK).sum(-1, dtype=torch.int32).to(torch.int16)
    groups = _int8_groups(codes)
    return (groups.reshape(*groups.shape[:3], 4 * PANEL).contiguous(), _by_panel(steps).half().contiguous(),
            _by_panel(sums).contiguous())


# Rows a call up to which the quantized panels run: their passes are compute-bound (each
# dequantizes again), the fp32 panels' first pass memory-bound, so a few rows gain most
# (1 row ~1.8-3x, 6 rows ~1.7x, 8 rows 0.9-1.3x on the development VM) and 32 or more run
# ~0.75x the fp32 panels' speed; both give the same bits, so the choice is free
QUANTIZED_MAX_ROWS = 8


@dataclass(frozen=True)
class QuantizedFormat:
    name: str
    values: Callable        # weight -> its codes and scales, or None
    exact: Callable         # values -> the exact panels' tensors
    exact_kernel: str
    int8: Callable          # values -> the 8-bit integer kernel's tensors
    int8_kernel: str


QUANTIZED_FORMATS = (QuantizedFormat("4-bit", _q4_values, _q4_panels, "q4_panel_linear",
                                     _q4_int8_panels, "q4_int8_linear"),
                     QuantizedFormat("8-bit", _q8_values, _q8_panels, "q8_panel_linear",
                                     _q8_int8_panels, "q8_int8_linear"))


def round_to_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> the nearest Q8_0 values (per block of 32 along k an fp16 step d = the
    largest magnitude / 127, each weight d * round(w / d)), which PackedLinear(int8=True) runs
    on the integer kernel; weight itself when K is not a multiple of 32. Lossy: for weights
    whose exact values do not matter (the heads only draft)."""
    n, k = weight.shape
    if k % QBLOCK:
        return weight
    blocks = weight.detach().float().reshape(n, k // QBLOCK, QBLOCK)
    step = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    codes = torch.where(step > 0, blocks / step, torch.zeros_like(blocks)).round().clamp(-128, 127)
    return (step * codes).reshape(n, k).to(weight.dtype)


def int8_supported() -> bool:
    """Whether this CPU runs the 8-bit integer kernels (AVX-512 with VNNI, kernels built)."""
    kernels = cpu_kernels()
    return kernels is not None and kernels.int8_linear_supported()


class PackedLinear(nn.Module):
    """y = x W^T + b over W packed once (panels or oneDNN); x may have any leading shape.

    `keep_weight` keeps the dense weight reachable as `.weight` (for a tied unembedding the
    embedding holds it anyway); otherwise only the packed copy stays in memory.
    """

    def __init__(self, linear: nn.Linear, keep_weight: bool = False, panels: bool = True, quantized: bool = True,
                 int8: bool = False):
        """panels=False: oneDNN even where the panel kernel runs; quantized=False: fp32 panels
        even for exact Q4_1 / Q8_0 weights (both for side-by-side benchmarks); int8=True: exact
        Q4_1 / Q8_0 weights multiply x rounded to 8 bits in integer arithmetic (close to the
        exact product, not equal; models/csrc/int8_linear.cpp), at every row count."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.kernels = cpu_kernels() if panels and weight.dtype == torch.float32 else None
        if int8 and not (self.kernels is not None and self.kernels.int8_linear_supported()):
            raise ValueError("8-bit integer linear layers need Gorgon's CPU kernels on a CPU with AVX-512 VNNI")
        self.layout = "panels" if self.kernels is not None else "oneDNN"
        self.kernel_name = "panel_linear" if self.kernels is not None else None
        self.quantized = self.int8 = None   # (kernel, its weight tensors...)
        for fmt in QUANTIZED_FORMATS if self.kernels is not None and (quantized or int8) else ():
            values = fmt.values(weight)
            if values is None:
                continue
            if int8:
                self.layout, self.int8 = f"{fmt.name} x 8-bit integers", (getattr(self.kernels, fmt.int8_kernel),
                                                                          *fmt.int8(*values))
            else:
                self.layout, self.quantized = f"{fmt.name} panels", (getattr(self.kernels, fmt.exact_kernel),
                                                                     *fmt.exact(*values))
            self.kernel_name = fmt.int8_kernel if int8 else fmt.exact_kernel
            break
        if self.int8 is not None:
            self.packed = None   # every call runs on the integer kernel
        elif self.kernels is not None:
            self.packed = _panels(weight)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2   # the model's calls: [T, in] rows, no reshaping (a few us a call at batch 1)
        rows = x if flat else x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if self.int8 is not None:
            kernel, *weights = self.int8
            out = kernel(rows, *weights, self.bias, self.out_features)
        elif self.quantized is not None and len(rows) <= QUANTIZED_MAX_ROWS:
            kernel, *weights = self.quantized
            out = kernel(rows, *weights, self.bias, self.out_features)
        elif self.kernels is not None:
            out = self.kernels.panel_linear(rows, self.packed, self.bias, self.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def kernel_spec(self) -> tuple | None:
        """(kernel name, its weight tensors, the fp32 panels or None, bias, out_features): what
        the C++ decoder (models/cpu_decoder.py) calls as forward() would; None for oneDNN."""
        if self.kernel_name is None:
            return None
        weights = (self.int8 or self.quantized or (None,))[1:]
        bias = None if self.bias is None else self.bias.detach()
        return self.kernel_name, list(weights), self.packed, bias, self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.layout}"


def pack_linears(module: nn.Module, keep_weights: tuple[str, ...] = (), panels: bool = True,
                 quantized: bool = True, int8: bool = False) -> int:
    """Replace every nn.Linear inside `module` by a PackedLinear; returns how many.

    `keep_weights` names (as in named_modules) the layers whose dense weight other code
    still reads (e.g. "lm_head").
    """
    replaced = 0
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, PackedLinear(child, full in keep_weights, panels, quantized, int8))
                replaced += 1
    return replaced
