"""The supported architectures, one row each: what differs between them outside their decoder module.

Keyed by the HF config's `model_type`. The registry reads config.json once through a row's `hf_fields` (the
decoders are then built from the ModelConfig alone), the loader builds `model_class()` and renames checkpoint
entries, the roofline counts `ffn_matrices`. Adding an architecture: its decoder module (a CausalLM,
model/protocol.py) and its row here. Torch-free, so the registry and the simulator read it without the model code.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch comes with it
    from aptserve.model.protocol import CausalLMClass


@dataclass(frozen=True)
class Architecture:
    module: str  # aptserve.model.<module> holds the decoder
    class_name: str  # its CausalLM, built as cls(model_config, device)
    # config.json -> the ModelConfig fields particular to the architecture (the registry reads the common ones).
    hf_fields: Callable[[dict], dict[str, Any]]
    ffn_matrices: int  # weight matrices of one feed-forward layer, each hidden_size x intermediate_size
    # Checkpoint name prefixes -> ours, for checkpoints saved from another class than *ForCausalLM.
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def model_class(self) -> CausalLMClass:
        """The decoder class, imported on demand (torch comes with it)."""
        return getattr(importlib.import_module(f"aptserve.model.{self.module}"), self.class_name)

    def checkpoint_name(self, name: str) -> str:
        """Our parameter name for a checkpoint entry's."""
        for prefix, ours in self.checkpoint_renames:
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        return name


def _llama_fields(hf: dict) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5 nests rope_theta here
    return {
        "intermediate_size": hf["intermediate_size"],
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "hidden_act": hf.get("hidden_act", "silu"),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_type": rope.get("rope_type", rope.get("type", "default")),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
    }


def _opt_fields(hf: dict) -> dict[str, Any]:
    bias = hf.get("enable_bias", True)
    return {
        "intermediate_size": hf["ffn_dim"],
        "attention_bias": bias,
        "mlp_bias": bias,
        "hidden_act": hf.get("activation_function", "relu"),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True),
        "do_layer_norm_before": hf.get("do_layer_norm_before", True),
        "word_embed_proj_dim": hf.get("word_embed_proj_dim") or 0,
        "layer_norm_elementwise_affine": hf.get("layer_norm_elementwise_affine", True),
        "remove_final_layer_norm": hf.get("_remove_final_layer_norm", False),
    }


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", _llama_fields, ffn_matrices=3),  # gate, up, down
    # Some OPT checkpoints were saved from OPTModel ("decoder.layers...") rather than OPTForCausalLM.
    "opt": Architecture("opt", "OPTForCausalLM", _opt_fields, ffn_matrices=2,  # fc1, fc2
                        checkpoint_renames=(("decoder.", "model.decoder."),)),
}
