"""Llama-family decoder (SmolLM2, Llama 2): RMSNorm, RoPE, GQA, SiLU-gated MLP; HF parameter names.

Checkpoints load into HF's modules (q/k/v_proj, gate/up/down_proj); `prepare()` then fuses q|k|v into one
projection and packs every weight for the CPU (model/linear.py), with the residual adds and SiLU-and-multiply
done inside the GEMMs.
"""
from __future__ import annotations

import torch
from torch import nn

from aptserve.config import ModelConfig
from aptserve.model.attention import paged_attention
from aptserve.model.attention_metadata import AttentionMetadata
from aptserve.model.hidden import invert_kv
from aptserve.model.linear import Linear, fuse_qkv, gemm_activation, packed_head
from aptserve.model.rms_norm import RMSNorm
from aptserve.model.rope import Rope, RotaryEmbedding, apply_rope, inverse_rope, pair_rows


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.qkv_proj: Linear | None = None  # set by prepare()
        self.kv_proj: Linear | None = None  # set by prepare() when the hidden cache may need K/V recomputed
        self.kv_inverse: Linear | None = None  # ... and its left inverse (K/V -> x), where one exists

    def prepare(self, keep_kv_projection: bool, keep_kv_inverse: bool, paired_rope: bool) -> None:
        """Fuse q|k|v (and k|v for recompute from hidden rows), then pack every weight; `paired_rope`: reorder
        the q and k rows of each head for the complex rotation (model/rope.py)."""
        if paired_rope:
            for projection in (self.q_proj, self.k_proj):
                projection.weight.data = pair_rows(projection.weight.data, self.head_dim)
                if projection.bias is not None:
                    projection.bias.data = pair_rows(projection.bias.data, self.head_dim)
        self.qkv_proj, self.kv_proj, self.kv_inverse = fuse_qkv(self.q_proj, self.k_proj, self.v_proj,
                                                                 keep_kv_projection, keep_kv_inverse)
        del self.q_proj, self.k_proj, self.v_proj
        self.o_proj.pack()

    def project_kv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K (with RoPE at the rows' positions) and V of normed inputs x [T, hidden]."""
        if self.kv_proj is None:
            raise RuntimeError("this model was prepared without the K/V projection the hidden cache needs")
        kv = self.kv_proj(x).view(-1, 2 * self.num_kv_heads, self.head_dim)
        return apply_rope(kv[:, :self.num_kv_heads], rope), kv[:, self.num_kv_heads:]

    def invert_kv(self, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The normed inputs x [T, hidden] whose K rows (rotated by `rope`) and V rows [T, kv_dim] these are
        (project_kv's inverse; multi-head attention only)."""
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), inverse_rope(rope)).flatten(1)
        return invert_kv(self.kv_inverse, k, v)

    def forward(self, x: torch.Tensor, rope: Rope, attn_metadata: AttentionMetadata,
                residual: torch.Tensor) -> torch.Tensor:
        """residual + o_proj(attention(x)), with q and k rotated in one pass."""
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = apply_rope(qkv[:, :self.num_heads + self.num_kv_heads], rope)
        q, k, v = qk[:, :self.num_heads], qk[:, self.num_heads:], qkv[:, self.num_heads + self.num_kv_heads:]
        out = paged_attention(self.layer_idx, x, q, k, v, attn_metadata, self.project_kv)
        return self.o_proj.forward_add(out, residual)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)
        self.activation = gemm_activation(config.hidden_act)

    def prepare(self) -> None:
        for projection in (self.gate_proj, self.up_proj, self.down_proj):
            projection.pack()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + down(act(gate(x)) * up(x)): three GEMMs, the activation, multiply and add inside them."""
        gated = self.up_proj.forward_mul(x, self.gate_proj(x, self.activation))
        return self.down_proj.forward_add(gated, residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor, rope: Rope, attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.self_attn(self.input_layernorm(hidden), rope, attn_metadata, residual=hidden)
        return self.mlp(self.post_attention_layernorm(hidden), residual=hidden)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        super().__init__()
        if config.rope_type != "default":
            raise NotImplementedError(f"rope_type {config.rope_type!r} is not supported (only the default RoPE)")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        max_positions = config.max_position_embeddings or config.max_model_len
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, max_positions, device)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        super().__init__()
        self.model = LlamaModel(config, device)
        self.tie_word_embeddings = config.tie_word_embeddings
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_head: Linear | None = None  # set by prepare()

    def prepare(self, keep_kv_projection: bool = False, keep_kv_inverse: bool = False) -> None:
        """Fuse and pack the weights for inference (after loading); `keep_kv_projection` for the hidden cache,
        `keep_kv_inverse` for demotion (CausalLM.prepare)."""
        paired_rope = self.model.embed_tokens.weight.dtype == torch.float32  # complex64 exists for fp32 only
        for layer in self.model.layers:
            layer.self_attn.prepare(keep_kv_projection, keep_kv_inverse, paired_rope)
            layer.mlp.prepare()
        self.model.rotary_emb.paired = paired_rope
        self.logits_head = packed_head(self, self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        rope = self.rope(positions)
        for layer in self.model.layers:
            hidden = layer(hidden, rope, attn_metadata)
        return self.model.norm(hidden)

    def rope(self, positions: torch.Tensor) -> Rope:
        """RoPE tables at absolute positions (also re-applied to K recomputed from hidden rows)."""
        return self.model.rotary_emb(positions, self.model.embed_tokens.weight.dtype)

    def attention_layers(self) -> list[LlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_head(hidden)
