"""Packed linear layers (our panel kernel, oneDNN) compute what nn.Linear computes."""
import pytest
import torch

from models.cpu_kernels import cpu_kernels
from models.packed_linear import PackedLinear, can_pack, int8_supported, pack_linears

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.float32), reason="no packed layout on this build")
needs_panels = pytest.mark.skipif(cpu_kernels() is None, reason="the panel kernel needs x86-64 with AVX2")
needs_int8 = pytest.mark.skipif(not int8_supported(), reason="the 8-bit integer kernels need AVX-512 VNNI")
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


@pytest.mark.parametrize("layer", [
    pytest.param(lambda: PackedLinear(torch.nn.Linear(576, 1000)), marks=needs_panels, id="fp32 panels"),
    pytest.param(lambda: PackedLinear(gguf_linear(200, 576, "q4", True), int8=True), marks=needs_int8, id="int8 q4"),
    pytest.param(lambda: PackedLinear(gguf_linear(200, 576, "q8", True), int8=True), marks=needs_int8, id="int8 q8")])
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(layer):
    """What makes a speculative tree and a plain step agree bit for bit in the linear layers
    (on the integer kernels: a row's rounding and sums depend on that row only)."""
    torch.manual_seed(0)
    packed = layer()
    x = torch.randn(23, 576)
    with torch.inference_mode():
        alone = torch.cat([packed(x[i:i + 1]) for i in range(len(x))])
        for rows in (2, 4, 5, 6, 7, 8, 9, 23):
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


def gguf_linear(out_features: int, in_features: int, kind: str, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    """A linear layer whose weights are Q4_1 or Q8_0 values, quantized as llama.cpp does (per
    block of 32 along k an fp16 step d: (max - min) / 15 and the minimum m for Q4_1, the
    largest magnitude / 127 for Q8_0) and dequantized as GGUF does (d * code + m, or d *
    code, in fp32, rounding after each operation)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    blocks = linear.weight.detach().reshape(out_features, -1, 32)
    if kind == "q4":
        low = blocks.amin(-1, keepdim=True).half().float()
        d = ((blocks.amax(-1, keepdim=True) - low) / 15).half().float()
        weights = d * ((blocks - low) / d).round().clamp(0, 15) + low
    else:
        d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        weights = d * (blocks / d).round().clamp(-128, 127)
    with torch.no_grad():
        linear.weight.copy_(weights.reshape(out_features, in_features))
    return linear


@needs_panels
@pytest.mark.parametrize("kind,layout", [("q4", "4-bit panels"), ("q8", "8-bit panels")])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 13, 40])
@pytest.mark.parametrize("in_features,out_features,bias", [(576, 960, False), (64, 17, True), (32, 1, True)])
def test_quantized_panels_give_the_bits_of_fp32_panels(kind, layout, rows, in_features, out_features, bias):
    """Exact Q4_1 / Q8_0 weights go to 4- / 8-bit panels, whose product has the fp32 panels'
    bits at every row count (1 to 6 rows a pass, several passes), partial panels too."""
    linear = gguf_linear(out_features, in_features, kind, bias, seed=rows)
    quantized, fp32 = PackedLinear(linear), PackedLinear(linear, quantized=False)
    assert quantized.layout == layout and fp32.layout == "panels" and layout in quantized.extra_repr()
    x = torch.randn(rows, in_features)
    kernel, codes, scales = quantized.quantized
    with torch.inference_mode():
        expected = fp32(x)
        assert torch.equal(quantized(x), expected)   # the quantized kernel up to 8 rows, then fp32 panels
        assert torch.equal(kernel(x, codes, scales, linear.bias, out_features), expected)   # any rows


@needs_panels
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_weights_that_are_not_exact_gguf_values_keep_fp32_panels(kind):
    linear = gguf_linear(48, 64, kind)
    assert PackedLinear(linear).quantized is not None
    with torch.no_grad():   # one weight off by an ulp
        linear.weight[3, 40] = torch.nextafter(linear.weight[3, 40], torch.tensor(1.0))
    assert PackedLinear(linear).quantized is None
    assert PackedLinear(torch.nn.Linear(48, 48)).quantized is None            # random fp32 weights
    assert PackedLinear(torch.nn.Linear(40, 8)).quantized is None             # k not a multiple of 32


def test_default_model_runs_on_quantized_panels(model):
    """The default model comes from a GGUF with Q4_1 layers and a Q8_0 embedding (the tied
    unembedding): all of them run on quantized panels, with the fp32 weights' bits."""
    if cpu_kernels() is None:
        pytest.skip("the panel kernel needs x86-64 with AVX2")
    layouts = {name: m.layout for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert layouts.pop("lm_head") == "8-bit panels"
    assert layouts and set(layouts.values()) == {"4-bit panels"}


def int8_reference(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """x rounded per block of 32 to 8-bit codes times max |x| / 127, times the weights, in
    float64: what the integer kernel computes, up to fp32 rounding of its scaled sums."""
    blocks = x.reshape(len(x), -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    rounded = ((blocks * inverse).round() * step).reshape(x.shape)
    out = rounded.double() @ linear.weight.double().T
    return (out + linear.bias.double() if linear.bias is not None else out).float()


@needs_int8
@pytest.mark.parametrize("kind,layout", [("q4", "4-bit x 8-bit integers"), ("q8", "8-bit x 8-bit integers")])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("in_features,out_features,bias", [(576, 960, False), (1536, 40, True), (32, 1, True)])
def test_int8_products_match_their_reference_and_stay_close_to_exact(kind, layout, rows, in_features,
                                                                     out_features, bias):
    """Every row count (1 to 8 rows a pass, several passes), partial panels, bias; the output
    is poisoned by nothing: each element is compared. Rounding x to 8 bits moves the product
    by well under 2% of its scale."""
    linear = gguf_linear(out_features, in_features, kind, bias, seed=rows)
    packed = PackedLinear(linear, int8=True)
    assert packed.layout == layout and packed.packed is None and packed.quantized is None
    x = torch.randn(rows, in_features)
    x[0, :32] = 0.0   # an all-zero block: step 0
    with torch.inference_mode():
        out, exact = packed(x), linear(x)
    torch.testing.assert_close(out, int8_reference(x, linear), atol=2e-6, rtol=1e-5)
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()


@needs_int8
def test_int8_leaves_other_weights_on_exact_panels():
    packed = PackedLinear(torch.nn.Linear(64, 48), int8=True)   # random fp32 weights: no codes to use
    assert packed.layout == "panels" and packed.int8 is None


@needs_int8
def test_default_model_on_int8_products_stays_close_to_exact(model, model_dir, tokenizer):
    """All 120 layer matrices and the unembedding run on the integer kernels; the next-token
    choice along a chat prompt is (nearly always) the exact model's."""
    from models.attention import KVCache, TorchAttention, build_metadata
    from models.loader import load_model
    int8 = load_model(model_dir, "float32", int8=True)
    layouts = {name: m.layout for name, m in int8.named_modules() if isinstance(m, PackedLinear)}
    assert layouts.pop("lm_head") == "8-bit x 8-bit integers"
    assert len(layouts) == 120 and set(layouts.values()) == {"4-bit x 8-bit integers"}
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Explain how a hash map works, with an example."}])
    config, n = model.config, len(ids)
    picks = []
    for m in (model, int8):
        cache = KVCache(config.num_hidden_layers, -(-n // 16), 16, config.num_key_value_heads, config.head_dim,
                        torch.float32)
        metadata = build_metadata([n], [n], [list(range(-(-n // 16)))], 16, 1)
        with torch.inference_mode():
            logits, _ = m(torch.tensor(ids), torch.arange(n), TorchAttention(metadata, cache), torch.arange(n))
        picks.append(logits.argmax(-1))
    assert (picks[0] == picks[1]).float().mean() > 0.9


@needs_panels
@pytest.mark.parametrize("rows", [1, 3, 17, 40])
def test_layer_kernels_match_pytorch(rows):
    """RMSNorm within an ulp of PyTorch's, the rotary embedding with its bits (in place on the
    first heads, the rest untouched); each row the same alone and in any batch."""
    from models.llama import apply_rotary, rotate_heads
    kernels = cpu_kernels()
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 576) * 3, torch.randn(576)
    normed = kernels.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(x, (576,), weight, 1e-5), atol=2e-6, rtol=1e-6)
    assert torch.equal(torch.cat([kernels.rms_norm(x[i:i + 1], weight, 1e-5) for i in range(rows)]), normed)
    qkv, cos, sin = torch.randn(rows, 15, 64), torch.randn(rows, 1, 64), torch.randn(rows, 1, 64)
    expected, untouched = apply_rotary(qkv[:, :12], cos, sin), qkv[:, 12:].clone()
    assert torch.equal(rotate_heads(qkv, 12, cos, sin), expected)
    assert torch.equal(qkv[:, 12:], untouched)
    # the residual addition fused into the norm: the sum in place, then the same bits as apart
    residual, delta = torch.randn(rows, 576), torch.randn(rows, 576)
    expected_sum = residual + delta
    fused = kernels.rms_norm(residual, weight, 1e-5, delta)
    assert torch.equal(residual, expected_sum) and torch.equal(fused, kernels.rms_norm(expected_sum, weight, 1e-5))
    # SwiGLU's silu(gate) * up, within a few ulps of PyTorch's, over the whole range of gates
    gate_up = torch.randn(rows, 2 * 1536) * 6
    gate_up[0, :4] = torch.tensor([-200.0, -0.0, 0.0, 200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.cat([kernels.silu_mul(gate_up[i:i + 1]) for i in range(rows)]), kernels.silu_mul(gate_up))


@needs_panels
@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_write_kv_kernel_matches_indexing(storage):
    """New keys and values (views of the stacked projection, as the model passes them) land in
    their slots with the bits indexing gives (fp16: rounded to nearest); slot -1 writes nothing."""
    torch.manual_seed(0)
    qkv = torch.randn(7, 9 + 2 * 3, 64)
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.tensor([5, -1, 0, 31, 17, -1, 8])
    caches = [torch.randn(4, 8, 3, 64).to(storage) for _ in range(4)]
    expected_k, expected_v, ours_k, ours_v = caches[0], caches[1], caches[0].clone(), caches[1].clone()
    cpu_kernels().write_kv(k, v, ours_k, ours_v, slots)
    keep = slots >= 0
    expected_k.view(-1, 3, 64)[slots[keep]] = k[keep].to(storage)
    expected_v.view(-1, 3, 64)[slots[keep]] = v[keep].to(storage)
    assert torch.equal(ours_k, expected_k) and torch.equal(ours_v, expected_v)
