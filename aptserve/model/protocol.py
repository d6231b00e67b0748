"""The model protocol: what the loader and the runner call on a decoder module, written once.

Every row of model/architectures.py names a class that satisfies it (tests/test_model_protocol.py compares
names and signatures). Implementations are torch nn.Modules with HF's parameter names: the loader builds them on
the meta device, fills them with load_state_dict(assign=True), then calls prepare(). Shapes: T tokens of one step,
ordered as the runner's AttentionMetadata lays them out. AttentionLayer, the part the hidden cache reaches, lives
in model/hidden.py (re-exported here).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from aptserve.config import ModelConfig
from aptserve.model.attention_metadata import AttentionMetadata
from aptserve.model.hidden import AttentionLayer

__all__ = ["AttentionLayer", "CausalLM", "CausalLMClass"]


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model as the runner drives it."""

    def prepare(self, keep_kv_projection: bool = False, keep_kv_inverse: bool = False) -> None:
        """Once, after the weights are loaded: fuse and pack them for inference; `keep_kv_projection` keeps each
        layer's K/V projection for the hidden cache (project_kv raises without it), `keep_kv_inverse` its left
        inverse for demoting K/V to hidden rows in place (invert_kv raises without it)."""
        ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """One step: token ids [T] at absolute positions [T], attending through the paged cache (and writing this
        step's K/V or hidden rows into it) -> final hidden states [T, D], D the vocabulary head's input width."""
        ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: AttentionMetadata) -> torch.Tensor:
        """nn.Module's call: runs forward."""
        ...

    def rope(self, positions: torch.Tensor) -> Any:
        """The positional tables that project_kv re-applies to K at absolute positions [N] (RoPE's rotation), or
        None where positions enter at the input only (OPT's learned table)."""
        ...

    def attention_layers(self) -> Sequence[AttentionLayer]:
        """The attention of every layer, in layer order (index = the layer's row of the cache)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [R, vocab_size] of final hidden rows [R, D] (only the rows that are sampled or
        scored)."""
        ...


class CausalLMClass(Protocol):
    """A decoder class, as the loader builds it (on the meta device; `device` is where position tables go)."""

    def __call__(self, config: ModelConfig, device: torch.device) -> CausalLM:
        ...
