"""Linear layers for inference: fused projections, and on CPU the weights packed once for oneDNN.

On CPU, torch's default fp32 GEMM goes through its BLAS, which on some x86 hosts (AMD among them) does not use
the widest vector units; oneDNN does, with the weight reordered once into its blocked layout. Measured on SmolLM2's
30 layers, 2 cores of an AVX-512 EPYC: 128 rows 238 ms -> 82 ms, 8 rows 43 -> 16 ms. The packed kernels also
apply an activation (swish, relu, gelu) or an elementwise add/multiply with another tensor inside the GEMM, which
saves the separate passes of the residual add and of SiLU-and-multiply. Where packing is not available (another
device, a dtype oneDNN cannot pack on this CPU) the same calls run on plain F.linear.
The products are the same sums in another order: fp32 results agree with F.linear to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows oneDNN plans the packed layout for; measured best from 1 to 512 rows (a hint of 1 is 1.5x slower).
PACK_BATCH_HINT = 128
# Few-row calls on the plain path compute W @ x^T, which CPU BLAS streams better than x @ W^T.
FEW_ROWS = 64
_ACTIVATIONS = {"none": lambda y: y, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}
# HF's activation names (hidden_act, OPT's activation_function) -> the ones applied inside the GEMM.
_HF_ACTIVATIONS = {"silu": "swish", "relu": "relu", "gelu": "gelu"}


def gemm_activation(hf_name: str) -> str:
    """The Linear.forward activation of an HF activation name."""
    if hf_name not in _HF_ACTIVATIONS:
        raise NotImplementedError(f"activation {hf_name!r} is not supported ({', '.join(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[hf_name]


def fuse_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear, keep_kv_projection: bool, keep_kv_inverse: bool = False,
             ) -> tuple[Linear, Linear | None, Linear | None]:
    """q|k|v as one packed GEMM; where hidden rows may need their K/V recomputed, k|v as another (packed on its own
    where q|k|v is packed, else a view of q|k|v's rows: no second copy); and where K/V may become hidden rows in
    place (`keep_kv_inverse`), k|v's left inverse (kv_left_inverse; None where K and V cannot give x back)."""
    qkv = Linear.fused([q, k, v])
    kv = inverse = None
    if keep_kv_projection:
        kv = Linear.fused([k, v]) if can_pack(qkv.weight) else qkv.output_rows(q.out_features)
        inverse = kv_left_inverse(kv) if keep_kv_inverse else None
        kv.pack()
    qkv.pack()
    return qkv, kv, inverse


def kv_left_inverse(kv: Linear) -> Linear | None:
    """The packed Linear that gives a layer's input x [N, in] back from y = x W^T + b [N, 2 * kv_dim] (K before RoPE,
    then V): x = (y - b) A^T with A = (W^T W)^-1 W^T, the least-squares left inverse, solved in float64 once. It
    exists where K and V have at least as many values as x (multi-head attention; W has full column rank), which is
    exactly where hidden rows are the smaller cache. Since y lies in W's range, A recovers x up to the rounding of
    one GEMM (measured: 4e-7 relative to max |K|, |V| re-projected in fp32 on OPT-125m, 5e-7 to 9e-7 on SmolLM2's
    trained q|k|v stacks of condition number 20-300). It takes as much memory as the k|v projection (a sixth of an
    OPT layer's weights), so it is built only where demotion is on (--preemption-mode hidden). None where
    in > 2 * kv_dim."""
    weight = kv.weight.detach()
    if weight.shape[0] < weight.shape[1]:
        return None
    w64 = weight.to(torch.float64)
    left = torch.linalg.solve(w64.T @ w64, w64.T)  # [in, out]
    with torch.device("meta"):
        inverse = Linear(weight.shape[0], weight.shape[1], bias=kv.bias is not None)
    inverse.weight = nn.Parameter(left.to(weight.dtype), requires_grad=False)
    if kv.bias is not None:
        inverse.bias = nn.Parameter(-(left @ kv.bias.detach().to(torch.float64)).to(weight.dtype),
                                    requires_grad=False)
    inverse.pack()
    return inverse


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., in], taking `W @ x^T` for few rows on CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or rows == 0 or rows > FEW_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    out = weight @ flat.t() if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packs fp32 weights on any x86 CPU build, bf16 only where the CPU has bf16 instructions."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear(nn.Linear):
    """nn.Linear (same parameters and names, so checkpoints load unchanged) that can pack its weight."""

    packed: torch.Tensor | None = None

    @classmethod
    def fused(cls, parts: list[nn.Linear]) -> Linear:
        """One Linear whose output is the parts' outputs side by side (q|k|v, k|v): one GEMM instead of several."""
        weight = torch.cat([p.weight.detach() for p in parts])
        with torch.device("meta"):
            fused = cls(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        return fused

    def output_rows(self, start: int) -> Linear:
        """A Linear of this one's outputs from `start` on, sharing its (unpacked) weight and bias: k|v of q|k|v."""
        if self.packed is not None:
            raise RuntimeError("a packed Linear's weight is in oneDNN's layout; take rows before packing")
        with torch.device("meta"):
            rows = type(self)(self.in_features, self.out_features - start, bias=self.bias is not None)
        rows.weight = nn.Parameter(self.weight.detach()[start:], requires_grad=False)
        if self.bias is not None:
            rows.bias = nn.Parameter(self.bias.detach()[start:], requires_grad=False)
        return rows

    def pack(self) -> None:
        """Reorder the weight for oneDNN once and drop the plain copy; nothing happens where it cannot pack."""
        if self.packed is not None or not can_pack(self.weight):
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_BATCH_HINT)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """activation(x W^T + b): "none", "swish" (SiLU), "relu" or "gelu"."""
        if self.packed is None:
            return _ACTIVATIONS[activation](linear(x, self.weight, self.bias))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, activation, [], "")

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x W^T + b + other (the residual add, inside the GEMM when packed)."""
        if self.packed is None:
            return linear(x, self.weight, self.bias) + other
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "add")

    def forward_mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x W^T + b) * other (the gated MLP's multiply, inside the GEMM when packed)."""
        if self.packed is None:
            return linear(x, self.weight, self.bias) * other
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "mul")


def packed_head(model: nn.Module, embed_tokens: nn.Embedding) -> Linear:
    """A packed copy of the vocabulary head: the embedding matrix when tied (the lookup keeps the plain one), else
    `model.lm_head`'s weight (lm_head itself is dropped)."""
    weight = embed_tokens.weight if model.tie_word_embeddings else model.lm_head.weight
    with torch.device("meta"):
        head = Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = nn.Parameter(weight.detach(), requires_grad=False)
    head.pack()
    if not model.tie_word_embeddings:
        del model.lm_head
    return head
