"""Llama's RMSNorm, computed by our one-pass CPU kernel in fp32 where it is built (model/csrc/rms_norm.cpp: torch's
CPU rms_norm takes 40-80 us on the few rows of a decode step and 1.6 ms on a 512-token chunk of SmolLM2, 61 times a
step), by torch otherwise. `use_rms_norm_kernel` switches a loaded model's norms over."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptserve.model.cpu_kernels import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = None  # set by use_rms_norm_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self.kernels is not None:
                out = torch.empty(x.shape, dtype=x.dtype)
                self.kernels.rms_norm(out, x.contiguous(), self.weight, self.eps)
                return out
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same arithmetic as below in fp32
        # Normalise in fp32 and cast back before the weight, exactly as HF does (greedy parity in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def use_rms_norm_kernel(model: nn.Module) -> bool:
    """Point a loaded fp32 CPU model's RMSNorms at our kernel where it is built; returns whether it did."""
    parameter = next(model.parameters())
    kernels = cpu_kernels() if parameter.device.type == "cpu" and parameter.dtype == torch.float32 else None
    norms = [module for module in model.modules() if isinstance(module, RMSNorm)]
    if kernels is None or not norms:
        return False
    for norm in norms:
        norm.kernels = kernels
    return True
