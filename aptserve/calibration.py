"""alpha: seconds to re-project one block's K and V across all layers, measured on the model's own
dtype and device. It prices the hidden cache in the Apt-Serve scheduler (hidden value = p - U*alpha*m).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time

import torch

from aptserve.config import ModelConfig
from aptserve.model.linear import Linear, can_pack
from aptserve.model.loader import torch_dtype
from aptserve.paths import cache_dir

logger = logging.getLogger(__name__)

BLOCK_COUNTS = (2, 8, 32)  # fit the slope at batch-like sizes: a lone block under-uses the GEMM


def _time_projection(x: torch.Tensor, projection: Linear, num_layers: int, device: str,
                     repeats: int) -> float:
    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(num_layers):
            projection(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: allocator, kernels, caches
        once()
    return statistics.median(once() for _ in range(repeats))


@torch.inference_mode()
def measure_alpha(model_config: ModelConfig, block_size: int, dtype: str, device: str,
                  repeats: int = 7) -> float:
    """Least-squares slope (seconds per block) of the K/V projection time over BLOCK_COUNTS, on the same fused,
    packed projection the model recomputes K/V with."""
    tensor_dtype = torch_dtype(dtype)
    projection = Linear(model_config.hidden_size, 2 * model_config.kv_dim, bias=False, dtype=tensor_dtype,
                        device=device).requires_grad_(False)
    projection.pack()
    points = []
    for num_blocks in BLOCK_COUNTS:
        x = torch.randn(num_blocks * block_size, model_config.hidden_size, dtype=tensor_dtype, device=device)
        points.append((num_blocks, _time_projection(x, projection, model_config.num_layers, device, repeats)))
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return max(slope, 1e-9)


def calibrated_alpha(model_config: ModelConfig, block_size: int, dtype: str, device: str) -> float:
    """measure_alpha, cached per model geometry, dtype, device and torch version."""
    # The kernel is part of the key: a value timed on another GEMM path must not price this one.
    kernel = "packed" if can_pack(torch.empty(0, dtype=torch_dtype(dtype), device=device)) else "plain"
    key = (f"{model_config.architecture}-L{model_config.num_layers}-H{model_config.hidden_size}"
           f"-KV{model_config.kv_dim}-B{block_size}-{dtype}-{device}-torch{torch.__version__}-{kernel}")
    path = cache_dir() / "alpha.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if key not in table:
        table[key] = measure_alpha(model_config, block_size, dtype, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
        logger.info("alpha for %s: %.3g s per block (measured)", key, table[key])
    return table[key]
