// The Python module of our CPU kernels (built by cpu_kernels.py).
#include <pybind11/stl.h>  // list[str] from std::vector<std::string>
#include <torch/python.h>  // the pybind11 casters of at::Tensor, without the C++ frontend (torch/all.h)

void paged_decode_attention(at::Tensor out, at::Tensor query, at::Tensor cache, at::Tensor k_units,
                            at::Tensor v_units, at::Tensor context_lens, double scale, int64_t num_kv_heads);
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps);
std::vector<std::string> prefill_attention_dtypes();
void prefill_attention(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value, int64_t offset,
                       double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged K/V cache (fp32 or bf16 rows)");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows, one pass");
  m.def("prefill_attention_dtypes", &prefill_attention_dtypes, "the dtypes prefill_attention is built for here");
  m.def("prefill_attention", &prefill_attention, "causal attention of a prefill chunk over its context");
}
