"""The few-row CPU linear gives F.linear's result, for every row count, with and without bias; fused q|k|v and
the hidden cache's k|v projection and left inverse."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aptserve.model.linear import FEW_ROWS, Linear, can_pack, fuse_qkv, linear


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep_kv_inverse", [False, True])
def test_fuse_qkv_keeps_k_v_for_the_hidden_cache_without_a_second_plain_copy(dtype, keep_kv_inverse) -> None:
    """k|v is a view of q|k|v's rows where q|k|v stays plain (float16 is never packed on CPU), its own packed copy
    where q|k|v is packed; the left inverse exists only when asked for, and gives x back from K|V."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (nn.Linear(16, 16).to(dtype) for _ in range(3))
    for part in (q, k, v):
        part.weight.data = torch.randn(16, 16, generator=generator).to(dtype)
    qkv, kv, inverse = fuse_qkv(q, k, v, keep_kv_projection=True, keep_kv_inverse=keep_kv_inverse)
    x = torch.randn(5, 16, generator=generator).to(dtype)
    expected = torch.cat([F.linear(x, k.weight, k.bias), F.linear(x, v.weight, v.bias)], dim=1)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(kv(x), expected, **tolerance)
    assert (qkv.packed is None) == (kv.packed is None) == (not can_pack(k.weight))
    if qkv.packed is None:
        assert kv.weight.data_ptr() == qkv.weight[16:].data_ptr()  # the same storage, not a copy
    assert (inverse is not None) == keep_kv_inverse
    if inverse is not None and dtype == torch.float32:
        torch.testing.assert_close(inverse(expected), x, rtol=1e-4, atol=1e-4)
    assert fuse_qkv(q, k, v, keep_kv_projection=False)[1:] == (None, None)
