"""The few-row CPU linear gives F.linear's result, for every row count, with and without bias."""
import pytest
import torch
import torch.nn.functional as F

from aptserve.model.linear import FEW_ROWS, Linear, linear


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
