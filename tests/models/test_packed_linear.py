"""oneDNN-packed linear layers compute what nn.Linear computes, for any leading shape."""
import pytest
import torch

from models.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.float32), reason="no oneDNN on this build")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (3, 5, 24), (24,)])
def test_packed_linear_matches_nn_linear(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = packed(x)
        assert out.shape == linear(x).shape
        torch.testing.assert_close(out, linear(x), atol=1e-5, rtol=1e-5)
        strided = torch.randn(5, 48)[:, ::2]   # non-contiguous rows
        torch.testing.assert_close(packed(strided), linear(strided), atol=1e-5, rtol=1e-5)


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
