// Helpers shared by the attention kernels: fp32, compiled with -O3 -ffast-math -march=native (see
// cpu_kernels.py), so that these loops are vectorised with the host's widest registers and exp comes from glibc's
// vector math. Nothing here is ever inf or NaN (-ffast-math assumes so): masked scores are kNoScore.
#pragma once

#include <cstdint>

namespace aptserve {

// Below every real score, and finite.
constexpr float kNoScore = -1e30f;

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void prefetch_unit(const float* unit, int64_t num_floats) {
  for (int64_t i = 0; i < num_floats; i += 16) __builtin_prefetch(unit + i, 0, 1);
}

inline void scale_add(float* acc, const float* v, float weight, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += weight * v[i];
}

}  // namespace aptserve
