// Helpers shared by the attention kernels: fp32 arithmetic over fp32 or bf16 rows, compiled with -O3 -ffast-math
// -march=native (see cpu_kernels.py), so that these loops are vectorised with the host's widest registers and exp
// comes from glibc's vector math. Nothing here is ever inf or NaN (-ffast-math assumes so): masked scores are kNoScore.
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

// bf16 values are stored as their bits (the upper half of an fp32's) and widened to fp32 as they are loaded: a
// zero-extend and a shift per lane, so the rows cost half the memory traffic and the sums stay fp32.
using bf16_bits = uint16_t;
typedef uint16_t Bits16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Bits32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Vec load(const bf16_bits* p) {
  Bits16 half;
  std::memcpy(&half, p, sizeof(Bits16));
  const Bits32 wide = __builtin_convertvector(half, Bits32) << 16;
  Vec v;
  std::memcpy(&v, &wide, sizeof(Vec));
  return v;
}

inline float to_float(float x) { return x; }

inline float to_float(bf16_bits x) {
  const uint32_t wide = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(float));
  return f;
}

inline float lanes_sum(Vec v) {
  float sum = 0.f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// Below every real score, and finite.
constexpr float kNoScore = -1e30f;

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

template <typename T>
inline void scale_add(float* acc, const T* v, float weight, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += weight * to_float(v[i]);
}

}  // namespace aptserve
