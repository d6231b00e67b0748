"""Llama-family decoder (SmolLM2, Llama 2): RMSNorm, RoPE, GQA, SiLU-gated MLP; HF parameter names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptserve.model.attention import paged_attention
from aptserve.model.attention_metadata import AttentionMetadata
from aptserve.model.linear import Linear, linear

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF does (greedy parity in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in fp32 like HF's default rope."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        inv_freq = 1.0 / (theta**exponents)
        freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [T, heads, head_dim]; rope tables [T, head_dim] (HF's rotate_half convention)."""
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: dict, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.num_heads
        hidden, bias = config["hidden_size"], config.get("attention_bias", False)
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def project_kv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K (with RoPE at the rows' positions) and V of normed inputs x [T, hidden]."""
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        return apply_rope(k, rope), v

    def forward(self, x: torch.Tensor, rope: Rope, attn_metadata: AttentionMetadata) -> torch.Tensor:
        q = apply_rope(self.q_proj(x).view(-1, self.num_heads, self.head_dim), rope)
        k, v = self.project_kv(x, rope)
        return self.o_proj(paged_attention(self.layer_idx, x, q, k, v, attn_metadata, self.project_kv))


class LlamaMLP(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        bias = config.get("mlp_bias", False)
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: dict, layer_idx: int) -> None:
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config["hidden_size"], eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor, rope: Rope, attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, attn_metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: dict, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config["num_hidden_layers"]))
        self.norm = RMSNorm(config["hidden_size"], config.get("rms_norm_eps", 1e-6))
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        max_positions = config["max_position_embeddings"]
        self.rotary_emb = RotaryEmbedding(head_dim, _rope_theta(config), max_positions, device)


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only the default RoPE)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: dict, device: torch.device) -> None:
        super().__init__()
        self.model = LlamaModel(config, device)
        self.tie_word_embeddings = config.get("tie_word_embeddings", False)
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config["hidden_size"], config["vocab_size"], bias=False)

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
        weight = self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return linear(hidden, weight)
