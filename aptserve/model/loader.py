"""Build our decoder modules for a ModelConfig and fill them from the folder's safetensors files."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from aptserve.config import DTYPE_BYTES, ModelConfig
from aptserve.model.architectures import ARCHITECTURES
from aptserve.model.protocol import CausalLM
from aptserve.model.rms_norm import use_rms_norm_kernel

# Checkpoint entries that are not parameters of ours: recomputed RoPE frequencies.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What nn modules' reset_parameters() call; every parameter comes from the checkpoint instead.
INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name in config.DTYPE_BYTES (the one list of supported dtypes)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_model(model_config: ModelConfig, dtype: str | torch.dtype, device: str | torch.device,
               keep_kv_projection: bool = False, keep_kv_inverse: bool = False) -> CausalLM:
    """Our module for the folder's architecture, weights cast to `dtype` on `device`, fused and packed for
    inference, in eval mode. `keep_kv_projection`: keep a K/V projection for recomputing from hidden rows;
    `keep_kv_inverse`: also its left inverse, for demoting K/V to hidden rows in place."""
    folder, device = Path(model_config.path), torch.device(device)
    architecture = ARCHITECTURES[model_config.architecture]
    model_class = architecture.model_class()
    with torch.device("meta"), _no_random_init():  # every parameter is assigned below
        model = model_class(model_config, device)
    expected = model.state_dict().keys()
    weights = {}
    for name, tensor in _read_safetensors(folder, device):
        name = architecture.checkpoint_name(name)
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and name not in expected):
            continue  # A tied lm_head is the embedding matrix itself.
        weights[name] = tensor.to(torch_dtype(dtype))
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.prepare(keep_kv_projection, keep_kv_inverse)
    use_rms_norm_kernel(model)
    return model


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Skip nn's parameter init while the modules are built: on meta tensors it computes nothing, but its first
    normal_ imports torch._dynamo, seconds of every engine's start-up."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _read_safetensors(folder: Path, device: torch.device):
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    else:
        files = sorted(path.name for path in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (save them with save_pretrained)")
    for file_name in files:
        with safe_open(folder / file_name, framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
