// RMSNorm of fp32 rows in one pass (CPU). torch 2.13's CPU rms_norm is several kernels with a temporary each: 40-80 us
// for the few rows of a decode step where this loop takes 5-7, and 1.6 ms for 512 rows of 576 where it takes 0.11
// (a Llama step runs 2 per layer + 1). The rows are split over threads only when there are enough of them to pay
// for waking them. (LayerNorm was tried too: torch's is one fused kernel already, no faster here at 512 rows.)
#include <ATen/core/Tensor.h>  // ATen only: torch/extension.h doubled the build (88 s -> 43 s for all three files)

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

namespace {
// About 64 KiB of rows per task: below that a thread's wake-up costs more than the loop.
int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, 16384 / hidden); }
}  // namespace

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat, "rms_norm: fp32 only");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors");
  TORCH_CHECK(x.device().is_cpu() && out.sizes() == x.sizes() && weight.numel() == x.size(-1), "rms_norm: shapes");
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = src + r * hidden;
      float* o = dst + r * hidden;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) squares += in[i] * in[i];
      const float inv = 1.f / std::sqrt(squares / hidden + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) o[i] = in[i] * inv * w[i];
    }
  });
}
