"""Build our decoder modules for a ModelConfig and fill them from the folder's safetensors files."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from aptserve.config import ModelConfig
from aptserve.model.llama import LlamaForCausalLM
from aptserve.model.opt import OPTForCausalLM

MODEL_CLASSES = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint entries that are not parameters of ours: recomputed RoPE frequencies.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_config: ModelConfig, dtype: str | torch.dtype, device: str | torch.device,
               keep_kv_projection: bool = False) -> nn.Module:
    """Our module for the folder's architecture, weights cast to `dtype` on `device`, fused and packed for
    inference, in eval mode. `keep_kv_projection`: keep a K/V projection for recomputing from hidden rows."""
    folder, device = Path(model_config.path), torch.device(device)
    hf_config = json.loads((folder / "config.json").read_text())
    model_class = MODEL_CLASSES[model_config.architecture]
    with torch.device("meta"):  # No memory and no random init: every parameter is assigned below.
        model = model_class(hf_config, device)
    expected = model.state_dict().keys()
    weights = {}
    for name, tensor in _read_safetensors(folder, device):
        name = _canonical_name(name, model_config.architecture)
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and name not in expected):
            continue  # A tied lm_head is the embedding matrix itself.
        weights[name] = tensor.to(torch_dtype(dtype))
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.prepare(keep_kv_projection)
    return model


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


def _canonical_name(name: str, architecture: str) -> str:
    # Some OPT checkpoints were saved from OPTModel ("decoder.layers...") rather than OPTForCausalLM.
    if architecture == "opt" and name.startswith("decoder."):
        return "model." + name
    return name
