// The Python module of our CPU kernels (built by cpu_kernels.py).
#include <torch/python.h>  // the pybind11 casters of at::Tensor, without the C++ frontend (torch/all.h)

void paged_decode_attention(at::Tensor out, at::Tensor query, at::Tensor cache, at::Tensor k_units,
                            at::Tensor v_units, at::Tensor context_lens, double scale, int64_t num_kv_heads);
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps);
bool has_bf16_prefill();
void prefill_attention_bf16(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value, int64_t offset,
                            double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged K/V cache (fp32 or bf16 rows)");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows, one pass");
  m.def("has_bf16_prefill", &has_bf16_prefill, "whether prefill_attention_bf16 is built (AVX-512 BF16)");
  m.def("prefill_attention_bf16", &prefill_attention_bf16, "causal attention of a bf16 prefill chunk");
}
