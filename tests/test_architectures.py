"""One table of architectures and one of dtypes: config.json is read once, by the registry, into the ModelConfig
the decoders are built from; the registry and the roofline read the table without torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aptserve.config import DTYPE_BYTES
from aptserve.errors import UnknownModelError
from aptserve.model.architectures import ARCHITECTURES
from aptserve.registry import load_model_config, resolve_model, shape_model_config

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100, "max_position_embeddings": 128,
         "intermediate_size": 96, "rms_norm_eps": 1e-5, "attention_bias": True, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "eos_token_id": [7, 8]}
OPT = {"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100,
       "max_position_embeddings": 128, "ffn_dim": 256, "enable_bias": False, "activation_function": "gelu",
       "word_embed_proj_dim": 32, "do_layer_norm_before": False, "_remove_final_layer_norm": True, "eos_token_id": 2}


def write_folder(tmp_path, hf: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


def test_registry_and_roofline_read_the_table_without_torch():
    code = ("import sys, aptserve.registry, aptserve.sim.roofline, aptserve.model.architectures\n"
            "loaded = [m for m in ('torch', 'transformers', 'aptserve.model.llama') if m in sys.modules]\n"
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_llama_keys_are_read_once_into_the_model_config(tmp_path):
    config = load_model_config(write_folder(tmp_path, LLAMA), max_model_len=64)
    assert (config.num_kv_heads, config.head_dim, config.intermediate_size) == (2, 16, 96)
    assert (config.max_model_len, config.max_position_embeddings, config.eos_token_ids) == (64, 128, (7, 8))
    assert (config.rms_norm_eps, config.rope_theta, config.rope_type) == (1e-5, 500000.0, "default")
    assert config.attention_bias and not config.mlp_bias and config.tie_word_embeddings
    assert config.hidden_act == "silu"
    older = {**LLAMA, "rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2}}
    config = load_model_config(write_folder(tmp_path, older))
    assert (config.rope_theta, config.rope_type) == (1e4, "linear")  # the decoder refuses it, not the registry


def test_opt_keys_are_read_once_into_the_model_config(tmp_path):
    config = load_model_config(write_folder(tmp_path, OPT))
    assert (config.num_kv_heads, config.head_dim, config.intermediate_size) == (4, 16, 256)
    assert not config.attention_bias and not config.mlp_bias
    assert (config.hidden_act, config.word_embed_proj_dim) == ("gelu", 32)
    assert not config.do_layer_norm_before and config.remove_final_layer_norm
    assert config.tie_word_embeddings and config.layer_norm_elementwise_affine  # OPT's defaults, not Llama's


def test_shape_only_configs_go_through_the_same_reading():
    config = shape_model_config("opt-350m")
    assert (config.hidden_size, config.intermediate_size, config.word_embed_proj_dim) == (1024, 4096, 512)
    assert not config.do_layer_norm_before and config.tie_word_embeddings and config.attention_bias
    assert config.hidden_act == "relu" and config.eos_token_ids == (2,)


def test_an_unsupported_model_type_names_the_supported_ones(tmp_path):
    path = write_folder(tmp_path, {**LLAMA, "model_type": "mistral"})
    with pytest.raises(UnknownModelError, match="'mistral' is not supported \\(supported: llama, opt\\)"):
        resolve_model(path)
    with pytest.raises(UnknownModelError, match="supported: llama, opt"):
        load_model_config(path)


def test_checkpoint_names_are_renamed_per_architecture():
    assert ARCHITECTURES["opt"].checkpoint_name("decoder.layers.0.fc1.weight") == "model.decoder.layers.0.fc1.weight"
    assert ARCHITECTURES["opt"].checkpoint_name("model.decoder.x") == "model.decoder.x"
    assert ARCHITECTURES["llama"].checkpoint_name("decoder.x") == "decoder.x"


def test_torch_dtypes_come_from_the_one_dtype_table():
    import torch

    from aptserve.model.loader import torch_dtype

    for name, num_bytes in DTYPE_BYTES.items():
        assert torch_dtype(name).itemsize == num_bytes
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        torch_dtype("int8")
