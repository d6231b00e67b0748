"""Every architecture's decoder satisfies the model protocol (model/protocol.py) by name and by signature, and the
check itself catches a decoder that drifts from it."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from aptserve.config import ModelConfig
from aptserve.model.architectures import ARCHITECTURES
from aptserve.model.protocol import AttentionLayer, CausalLM, CausalLMClass


def members(protocol: type) -> list[str]:
    """The methods the protocol declares (its own, __call__ included)."""
    return [name for name, value in vars(protocol).items()
            if callable(value) and (not name.startswith("_") or name == "__call__")]


def _params(function) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


def mismatch(declared, implemented) -> str | None:
    """Why `implemented` cannot stand for `declared`: the same parameters in order (kind, name, and a default
    wherever one is declared); more are allowed only at the end and with defaults."""
    want, have = _params(declared), _params(implemented)
    for i, param in enumerate(want):
        if i >= len(have):
            return f"lacks parameter {param.name!r}"
        got = have[i]
        if (got.name, got.kind) != (param.name, param.kind):
            return f"parameter {i} is {got.name!r} ({got.kind.description}), declared {param.name!r}"
        if param.default is not inspect.Parameter.empty and got.default is inspect.Parameter.empty:
            return f"parameter {param.name!r} lacks its default"
    extra = [p.name for p in have[len(want):] if p.default is inspect.Parameter.empty and p.kind not in
             (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return f"extra required parameters {extra}" if extra else None


def violations(cls: type, protocol: type) -> dict[str, str]:
    """Protocol member -> what is wrong with `cls`'s (nn.Module's __call__ runs forward: that is compared)."""
    found = {}
    for name in members(protocol):
        implemented = cls.forward if name == "__call__" and issubclass(cls, nn.Module) else getattr(cls, name, None)
        if not callable(implemented):
            found[name] = "missing"
        elif (why := mismatch(getattr(protocol, name), implemented)) is not None:
            found[name] = why
    return found


def tiny_config(architecture: str) -> ModelConfig:
    return ModelConfig(path="tiny", architecture=architecture, num_layers=2, hidden_size=32, num_heads=4,
                       num_kv_heads=2 if architecture == "llama" else 4, head_dim=8, vocab_size=16,
                       max_model_len=32, max_position_embeddings=32, intermediate_size=64)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_class_satisfies_the_protocol(architecture):
    cls = ARCHITECTURES[architecture].model_class()
    assert issubclass(cls, nn.Module)  # the loader's load_state_dict / eval / requires_grad_
    assert violations(cls, CausalLM) == {}
    assert mismatch(CausalLMClass.__call__, cls.__init__) is None


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_builds_from_its_model_config_with_protocol_layers(architecture):
    with torch.device("meta"):
        model = ARCHITECTURES[architecture].model_class()(tiny_config(architecture), torch.device("cpu"))
    assert isinstance(model, CausalLM)
    layers = model.attention_layers()
    assert len(layers) == 2
    for layer in layers:
        assert isinstance(layer, AttentionLayer) and violations(type(layer), AttentionLayer) == {}


def test_the_check_catches_a_missing_method_and_changed_signatures():
    class Drifted(nn.Module):
        def __init__(self, config: ModelConfig) -> None:  # no device
            super().__init__()

        def prepare(self, keep_kv_projection: bool) -> None:  # the default dropped
            pass

        def forward(self, input_ids, attn_metadata, positions):  # reordered
            pass

        def rope(self, positions, dtype):  # a new required parameter
            pass

        def attention_layers(self):
            return []
        # compute_logits missing

    found = violations(Drifted, CausalLM)
    assert set(found) == {"prepare", "forward", "__call__", "rope", "compute_logits"}
    assert found["compute_logits"] == "missing"
    assert mismatch(CausalLMClass.__call__, Drifted.__init__) == "lacks parameter 'device'"
    assert set(members(CausalLM)) == {"prepare", "forward", "__call__", "rope", "attention_layers", "compute_logits"}
