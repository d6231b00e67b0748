"""Linear layers laid out for CPU decode batches.

At decode batch sizes a step streams every weight from DRAM, and CPU BLAS runs `x @ W^T` (W [out, in]) well below
the bandwidth it reaches on `W @ x^T`: measured on SmolLM2's 30 layers on 2 EPYC cores, 4 rows take 98 ms vs 49 ms,
16 rows 97 vs 73 ms, and the 49k x 576 vocabulary head 30 vs 8 ms for 2-8 rows. From a few dozen rows on (prefill)
the two are equal, and on GPUs the library picks its own kernel, so only few-row CPU calls take the other order.
The products are the same sums in another order: fp32 results agree to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., in], taking `W @ x^T` for few rows on CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or rows == 0 or rows > FEW_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if bias is None:
        out = weight @ flat.t()
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and names, so checkpoints load unchanged) with the CPU few-row order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
