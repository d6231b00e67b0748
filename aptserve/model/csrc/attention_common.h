// Helpers shared by the attention kernels: fp32, compiled with -O3 -ffast-math -march=native (see
// cpu_kernels.py), so that these loops are vectorised with the host's widest registers and exp comes from glibc's
// vector math. Nothing here is ever inf or NaN (-ffast-math assumes so): masked scores are kNoScore.
#pragma once

#include <cstdint>
#include <cstring>

namespace aptserve {

// The compiler's generic vector of the host's widest float registers (-march=native): AVX-512, AVX, else 4 lanes.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

inline float lanes_sum(Vec v) {
  float sum = 0.f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// Below every real score, and finite.
constexpr float kNoScore = -1e30f;

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void scale_add(float* acc, const float* v, float weight, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += weight * v[i];
}

}  // namespace aptserve
