"""Rotary position embeddings (HF's default rope), applied to q and k in one pass.

HF rotates the two halves of each head together (x_i with x_{i + D/2}). In fp32 the model reorders the rows of
each q and k head in the projection weights once, at load, so that each rotated pair sits side by side; the
rotation is then a single complex multiply. q and k are reordered alike, so every q.k product, and with it
attention, is unchanged (the cache holds K in the same order, and V is not touched). Other dtypes, which have no
complex type here, keep HF's order and rotate with a roll.
"""
from __future__ import annotations

import torch
from torch import nn

# Complex positional factors [T, 1, D/2] (pairs side by side), or (cos, signed sin) [T, 1, D] (HF's halves).
Rope = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def pair_rows(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head of a q or k projection weight (or bias) reordered [0, D/2, 1, D/2 + 1, ...]."""
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    heads = tensor.view(-1, head_dim, *tensor.shape[1:])
    return heads[:, order.to(tensor.device)].reshape(tensor.shape)


class RotaryEmbedding(nn.Module):
    """Tables for every position, computed once in fp32 like HF's default rope."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        inv_freq = 1.0 / (theta**exponents)
        freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [positions, D/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.paired = False  # set when the q/k weights were reordered by pair_rows

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        cos, sin = self.cos[positions], self.sin[positions]
        if self.paired:
            return torch.complex(cos, sin).unsqueeze(1)
        cos, sin = cos.to(dtype), sin.to(dtype)
        return torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([-sin, sin], dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [T, heads, D] (a strided view is fine) rotated at its rows' positions; a new contiguous tensor."""
    if isinstance(rope, torch.Tensor):
        pairs = x.unflatten(-1, (-1, 2))
        if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-2]):
            pairs = pairs.contiguous()
        return torch.view_as_real(torch.view_as_complex(pairs) * rope).flatten(-2)
    # x*cos + rotate_half(x)*sin, with rotate_half(x)*sin == roll(x, D/2) * [-sin | sin] term by term.
    cos, signed_sin = rope
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def inverse_rope(rope: Rope) -> Rope:
    """The rotation that undoes `rope` (by the same angles, backwards)."""
    if isinstance(rope, torch.Tensor):
        return rope.conj()
    cos, signed_sin = rope
    return cos, -signed_sin
