"""OPT decoder: learned positions (offset 2), LayerNorm, ReLU FFN, pre-LN or post-LN (opt-350m),
optional project_in/project_out when word_embed_proj_dim != hidden_size; HF parameter names.

Checkpoints load into HF's modules; `prepare()` then fuses q|k|v and packs every weight for the CPU
(model/linear.py), with the ReLU and the residual adds done inside the GEMMs.
"""
from __future__ import annotations

import torch
from torch import nn

from aptserve.config import ModelConfig
from aptserve.model.attention import paged_attention
from aptserve.model.attention_metadata import AttentionMetadata
from aptserve.model.hidden import invert_kv
from aptserve.model.linear import Linear, fuse_qkv, gemm_activation, packed_head

# OPT's position table starts 2 rows in (a fairseq legacy of its padding scheme).
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = Linear(hidden, hidden, bias=bias)
        self.k_proj = Linear(hidden, hidden, bias=bias)
        self.v_proj = Linear(hidden, hidden, bias=bias)
        self.out_proj = Linear(hidden, hidden, bias=bias)
        self.qkv_proj: Linear | None = None  # set by prepare()
        self.kv_proj: Linear | None = None  # set by prepare() when the hidden cache may need K/V recomputed
        self.kv_inverse: Linear | None = None  # ... and its left inverse (K/V -> x)

    def prepare(self, keep_kv_projection: bool, keep_kv_inverse: bool) -> None:
        """Fuse q|k|v (and k|v for recompute from hidden rows, with its inverse for demotion), then pack every
        weight."""
        self.qkv_proj, self.kv_proj, self.kv_inverse = fuse_qkv(self.q_proj, self.k_proj, self.v_proj,
                                                                 keep_kv_projection, keep_kv_inverse)
        del self.q_proj, self.k_proj, self.v_proj
        self.out_proj.pack()

    def project_kv(self, x: torch.Tensor, rope: None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of inputs x [T, hidden]; `rope` is always None (OPT has learned positions)."""
        if self.kv_proj is None:
            raise RuntimeError("this model was prepared without the K/V projection the hidden cache needs")
        kv = self.kv_proj(x).view(-1, 2 * self.num_heads, self.head_dim)
        return kv[:, :self.num_heads], kv[:, self.num_heads:]

    def invert_kv(self, k: torch.Tensor, v: torch.Tensor, rope: None = None) -> torch.Tensor:
        """The inputs x [T, hidden] whose K and V rows [T, hidden] these are (project_kv's inverse)."""
        return invert_kv(self.kv_inverse, k, v)

    def forward(self, x: torch.Tensor, attn_metadata: AttentionMetadata, residual: torch.Tensor) -> torch.Tensor:
        """residual + out_proj(attention(x))."""
        qkv = self.qkv_proj(x).view(-1, 3 * self.num_heads, self.head_dim)
        # HF scales q before attention (and attends with scale 1): same rounding as the reference.
        q = qkv[:, :self.num_heads] * self.scaling
        k, v = qkv[:, self.num_heads:2 * self.num_heads], qkv[:, 2 * self.num_heads:]
        out = paged_attention(self.layer_idx, x, q, k, v, attn_metadata, self.project_kv, scale=1.0)
        return self.out_proj.forward_add(out, residual)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        affine = config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = Linear(hidden, ffn, bias=bias)
        self.fc2 = Linear(ffn, hidden, bias=bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.activation = gemm_activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        if self.do_layer_norm_before:
            hidden = self.self_attn(self.self_attn_layer_norm(hidden), attn_metadata, residual=hidden)
            return self.fc2.forward_add(self.fc1(self.final_layer_norm(hidden), self.activation), hidden)
        # Post-LN (opt-350m): the attention input x is the residual stream itself.
        hidden = self.self_attn_layer_norm(self.self_attn(hidden, attn_metadata, residual=hidden))
        return self.final_layer_norm(self.fc2.forward_add(self.fc1(hidden, self.activation), hidden))


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, proj_dim = config.hidden_size, embed_dim(config)
        max_positions = config.max_position_embeddings or config.max_model_len
        self.embed_tokens = nn.Embedding(config.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(max_positions + POSITION_OFFSET, hidden)
        self.project_in = Linear(proj_dim, hidden, bias=False) if proj_dim != hidden else None
        self.project_out = Linear(hidden, proj_dim, bias=False) if proj_dim != hidden else None
        keep_final_norm = config.do_layer_norm_before and not config.remove_final_layer_norm
        affine = config.layer_norm_elementwise_affine
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine) if keep_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_layers))


def embed_dim(config: ModelConfig) -> int:
    """Width of the token embedding (and of a tied vocabulary head)."""
    return config.word_embed_proj_dim or config.hidden_size


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        super().__init__()
        del device  # Nothing position-dependent to precompute (Llama builds its RoPE tables there).
        self.model = OPTModel(config)
        self.tie_word_embeddings = config.tie_word_embeddings
        if not self.tie_word_embeddings:
            self.lm_head = Linear(embed_dim(config), config.vocab_size, bias=False)
        self.logits_head: Linear | None = None  # set by prepare()

    def prepare(self, keep_kv_projection: bool = False, keep_kv_inverse: bool = False) -> None:
        """Fuse and pack the weights for inference (after loading); `keep_kv_projection` for the hidden cache,
        `keep_kv_inverse` for demotion (CausalLM.prepare)."""
        decoder = self.model.decoder
        for layer in decoder.layers:
            layer.self_attn.prepare(keep_kv_projection, keep_kv_inverse)
            layer.fc1.pack()
            layer.fc2.pack()
        for projection in (decoder.project_in, decoder.project_out):
            if projection is not None:
                projection.pack()
        self.logits_head = packed_head(self, decoder.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        decoder = self.model.decoder
        hidden = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + decoder.embed_positions(positions + POSITION_OFFSET)
        for layer in decoder.layers:
            hidden = layer(hidden, attn_metadata)
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return hidden

    def rope(self, positions: torch.Tensor) -> None:
        """No rotary tables: OPT adds learned positions at the input, so K needs nothing re-applied."""
        return None

    def attention_layers(self) -> list[OPTAttention]:
        return [layer.self_attn for layer in self.model.decoder.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_head(hidden)
