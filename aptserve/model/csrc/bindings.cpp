// The Python module of our CPU kernels (built by cpu_kernels.py).
#include <torch/extension.h>

void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor cache, torch::Tensor k_units,
                            torch::Tensor v_units, torch::Tensor context_lens, double scale, int64_t num_kv_heads);
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged K/V cache (fp32)");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows, one pass");
}
