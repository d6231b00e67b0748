"""GPU specifications for the simulator's roofline cost model: the vendors' datasheet figures (dense fp16/bf16
tensor-core peak, memory bandwidth, memory as the driver reports it, NVLink bandwidth per direction, or PCIe's where
the card has no NVLink).

The L4 (NVIDIA L4 datasheet): 242 TFLOPS fp16 with sparsity, so 121 dense; 300 GB/s of GDDR6; 24 GB, of which the
driver reports 23,034 MiB; PCIe Gen4 x16, 64 GB/s both ways, so 32 GB/s one way."""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_fp16_flops: float  # dense, tensor cores
    hbm_bytes_per_s: float  # device memory bandwidth (HBM, or GDDR on the L4)
    memory_bytes: int
    link_bytes_per_s: float  # NVLink (PCIe without it), one direction, per GPU (tensor-parallel all-reduce)


GPUS = {spec.name: spec for spec in (
    GPUSpec("a100-40gb", 312e12, 1.555e12, 40 * GIB, 300e9),
    GPUSpec("a100-80gb", 312e12, 2.039e12, 80 * GIB, 300e9),
    GPUSpec("h100-80gb", 989e12, 3.35e12, 80 * GIB, 450e9),
    GPUSpec("h200", 989e12, 4.8e12, 141 * GIB, 450e9),
    GPUSpec("l4", 121e12, 300e9, 23034 * (1 << 20), 32e9),
)}


def gpu_spec(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: use one of {', '.join(GPUS)}") from None
