// The Python module of our CPU kernels (built by cpu_kernels.py).
#include <torch/python.h>  // the pybind11 casters of at::Tensor, without the C++ frontend (torch/all.h)

void paged_decode_attention(at::Tensor out, at::Tensor query, at::Tensor cache, at::Tensor k_units,
                            at::Tensor v_units, at::Tensor context_lens, double scale, int64_t num_kv_heads);
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged K/V cache (fp32)");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows, one pass");
}
