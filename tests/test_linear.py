"""The CPU linears give F.linear's result on every path (BLAS few-row, our few-row kernel, oneDNN), for every row
count, with and without bias and fused epilogues."""
import pytest
import torch
import torch.nn.functional as F

from aptserve.model.cpu_kernels import cpu_kernels
from aptserve.model.linear import FEW_ROWS, KERNEL_MAX_ROWS, Linear, linear, packed_head


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_torch(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator)
    weight = torch.randn(160, 96, generator=generator)
    bias = torch.randn(160, generator=generator) if with_bias else None
    out = linear(x, weight, bias)
    assert out.shape == (rows, 160) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_module_keeps_parameter_names_and_leading_dims() -> None:
    layer = Linear(8, 5)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer(torch.randn(0, 8)).shape == (0, 5)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 16, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prepared_layer_matches_torch_on_every_path(rows: int, with_bias: bool) -> None:
    """Shapes off every tile and vector width (161 outputs, 100 inputs), fused epilogues included."""
    generator = torch.Generator().manual_seed(rows)
    layer = Linear(100, 161, bias=with_bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(161, 100, generator=generator))
        if with_bias:
            layer.bias.copy_(torch.randn(161, generator=generator))
    expected = F.linear(x := torch.randn(rows, 100, generator=generator), layer.weight.clone(),
                        None if layer.bias is None else layer.bias.clone())
    other = torch.randn(rows, 161, generator=generator)
    layer.pack()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x, "swish"), F.silu(expected), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer.forward_add(x, other), expected + other, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer.forward_mul(x, other), expected * other, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not built here")
def test_with_the_kernel_built_fp32_weights_stay_plain_and_the_tied_head_shares_the_embedding() -> None:
    layer = Linear(64, 32)
    layer.pack()
    assert layer.kernels is not None and layer.packed is None and layer.weight.shape == (32, 64)
    model = torch.nn.Module()
    model.tie_word_embeddings = True
    embedding = torch.nn.Embedding(50, 64)
    head = packed_head(model, embedding)
    assert head.weight.data_ptr() == embedding.weight.data_ptr()
