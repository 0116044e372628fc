"""Packed linear layers (our panel kernel, oneDNN) compute what nn.Linear computes."""
import pytest
import torch

from models.cpu_kernels import cpu_kernels
from models.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.float32), reason="no packed layout on this build")
needs_panels = pytest.mark.skipif(cpu_kernels() is None, reason="the panel kernel needs x86-64 with AVX2")
LAYOUTS = [pytest.param(True, marks=needs_panels, id="panels"), pytest.param(False, id="onednn")]


@pytest.mark.parametrize("panels", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (3, 5, 24), (24,)])
def test_packed_linear_matches_nn_linear(panels, bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    packed = PackedLinear(linear, panels=panels)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = packed(x)
        assert out.shape == linear(x).shape
        torch.testing.assert_close(out, linear(x), atol=1e-5, rtol=1e-5)
        strided = torch.randn(5, 48)[:, ::2]   # non-contiguous rows
        torch.testing.assert_close(packed(strided), linear(strided), atol=1e-5, rtol=1e-5)


@needs_panels
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 40])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (33, 17), (8, 1), (100, 48)])
def test_panels_match_float64_reference_for_any_row_count(rows, in_features, out_features):
    """Every row group (1..6 rows a pass), partial last panels, odd sizes; poisoned output
    memory would show as a mismatch."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features)
    expected = (x.double() @ linear.weight.double().T + linear.bias.double()).float()
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), expected, atol=1e-4, rtol=1e-4)


@needs_panels
def test_a_row_gets_the_same_bits_alone_and_in_any_batch():
    """What makes a speculative tree and a plain step agree bit for bit in the linear layers."""
    torch.manual_seed(0)
    packed = PackedLinear(torch.nn.Linear(576, 1000))
    x = torch.randn(23, 576)
    with torch.inference_mode():
        alone = torch.cat([packed(x[i:i + 1]) for i in range(len(x))])
        for rows in (2, 4, 6, 7, 23):
            assert torch.equal(packed(x[:rows]), alone[:rows])


@needs_panels
def test_panel_kernel_refuses_what_it_cannot_compute():
    kernels = cpu_kernels()
    panels = torch.zeros(2, 8, 16)
    with pytest.raises(RuntimeError, match="fp32"):
        kernels.panel_linear(torch.zeros(1, 8, dtype=torch.float64), panels, None, 20)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.panel_linear(torch.zeros(1, 9), panels, None, 20)
    with pytest.raises(RuntimeError, match="panels"):
        kernels.panel_linear(torch.zeros(1, 8), panels, None, 40)


def test_pack_linears_replaces_every_linear_and_keeps_named_weights():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
        assert pack_linears(model, keep_weights=("2",)) == 2
        assert isinstance(model[0], PackedLinear) and model[0].weight is None
        assert model[2].weight is not None and model[2].weight.shape == (4, 8)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_loaded_model_is_packed_on_cpu(model):
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight   # tied, not copied
    assert (model.lm_head.kernels is not None) == (cpu_kernels() is not None)


def q4_linear(out_features: int, in_features: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    """A linear layer whose weights are Q4_1 values, quantized as llama.cpp does (per block of
    32 along k: fp16 step d = (max - min) / 15 and minimum m, 4-bit codes) and dequantized as
    GGUF does (d * code + m in fp32, two roundings)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    blocks = linear.weight.detach().reshape(out_features, -1, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = ((high - low) / 15).half().float()
    m = low.half().float()
    codes = ((blocks - m) / d).round().clamp(0, 15)
    with torch.no_grad():
        linear.weight.copy_((d * codes + m).reshape(out_features, in_features))
    return linear


@needs_panels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 13, 40])
@pytest.mark.parametrize("in_features,out_features,bias", [(576, 960, False), (64, 17, True), (32, 1, True)])
def test_4bit_panels_give_the_bits_of_fp32_panels(rows, in_features, out_features, bias):
    """Exact Q4_1 weights go to 4-bit panels, whose product has the fp32 panels' bits at every
    row count (fused passes up to 8 rows, a dequantized buffer beyond), partial panels too."""
    linear = q4_linear(out_features, in_features, bias, seed=rows)
    q4, fp32 = PackedLinear(linear), PackedLinear(linear, q4=False)
    assert q4.q4 is not None and fp32.q4 is None and "4-bit" in q4.extra_repr()
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        assert torch.equal(q4(x), fp32(x))


@needs_panels
def test_weights_that_are_not_exact_q4_keep_fp32_panels():
    linear = q4_linear(48, 64)
    assert PackedLinear(linear).q4 is not None
    with torch.no_grad():
        linear.weight[3, 40] = torch.nextafter(linear.weight[3, 40], torch.tensor(1.0))   # one weight off by an ulp
    assert PackedLinear(linear).q4 is None
    assert PackedLinear(torch.nn.Linear(48, 48)).q4 is None            # random fp32 weights
    assert PackedLinear(q4_linear(8, 32)).q4 is not None
    assert PackedLinear(torch.nn.Linear(40, 8)).q4 is None             # k not a multiple of 32


def test_default_model_layers_run_on_4bit_panels(model):
    """The default model comes from a Q4_1 GGUF: every layer's linear layers are exact 4-bit
    panels (the unembedding, Q8_0 in the GGUF, stays fp32)."""
    if cpu_kernels() is None:
        pytest.skip("the panel kernel needs x86-64 with AVX2")
    layers = [m for name, m in model.named_modules() if isinstance(m, PackedLinear) and name != "lm_head"]
    assert layers and all(m.q4 is not None for m in layers)
