// y = x W^T (+ bias) (then + other or * other) for a few rows of x (CPU, fp32): the decode step's GEMMs.
//
// With a handful of rows a linear layer is a pass over its weight, and its time is the time to stream the
// weight from memory. Each weight row is read once, into registers in tiles of kTileN rows, and multiplied by
// kTileM rows of x at a time (x stays in L1); the tiles two ahead are prefetched while this one is used. Written
// with the compiler's generic vectors, so -march=native picks the register width (AVX2, AVX-512, NEON).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int kTileN = 4;      // weight rows held in registers
constexpr int kTileM = 3;      // x rows multiplied by each of them
constexpr int kPrefetchTiles = 2;

enum Epilogue : int64_t { kNone = 0, kAdd = 1, kMul = 2 };

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline float lanes_sum(Vec v) {
  float sum = 0.f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

struct Problem {
  const float* x;
  const float* w;
  const float* bias;   // nullptr: none
  const float* other;  // [M, N] or nullptr
  float* out;
  int64_t K, N;
  Epilogue epilogue;

  void store(int64_t m, int64_t n, float dot) const {
    float y = bias ? dot + bias[n] : dot;
    if (epilogue == kAdd) y += other[m * N + n];
    if (epilogue == kMul) y *= other[m * N + n];
    out[m * N + n] = y;
  }
};

// Rows [m0, m0 + TM) of x against weight rows [n0, n0 + TN); `prefetch` is the weight tile to bring in meanwhile.
template <int TN, int TM>
void tile(const Problem& p, int64_t n0, int64_t m0, const float* prefetch) {
  Vec acc[TM][TN] = {};
  const int64_t K = p.K, vec_end = K - K % kLanes;
  for (int64_t k = 0; k < vec_end; k += kLanes) {
    if (prefetch && k % 16 == 0)
      for (int r = 0; r < TN; ++r) __builtin_prefetch(prefetch + r * K + k, 0, 3);
    Vec w[TN];
    for (int r = 0; r < TN; ++r) w[r] = load(p.w + (n0 + r) * K + k);
    for (int i = 0; i < TM; ++i) {
      const Vec xv = load(p.x + (m0 + i) * K + k);
      for (int r = 0; r < TN; ++r) acc[i][r] += xv * w[r];
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int r = 0; r < TN; ++r) {
      float dot = lanes_sum(acc[i][r]);
      for (int64_t k = vec_end; k < K; ++k) dot += p.x[(m0 + i) * K + k] * p.w[(n0 + r) * K + k];
      p.store(m0 + i, n0 + r, dot);
    }
}

template <int TN>
void weight_rows(const Problem& p, int64_t M, int64_t n0, const float* prefetch) {
  int64_t m = 0;
  for (; m + kTileM <= M; m += kTileM) tile<TN, kTileM>(p, n0, m, m == 0 ? prefetch : nullptr);
  for (; m < M; ++m) tile<TN, 1>(p, n0, m, m == 0 ? prefetch : nullptr);
}

}  // namespace

void few_rows_linear(torch::Tensor out, torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                     c10::optional<torch::Tensor> other, int64_t epilogue) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat &&
                  out.scalar_type() == torch::kFloat, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K], weight [N, K]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(epilogue >= kNone && epilogue <= kMul && (epilogue == kNone) == !other.has_value(), "epilogue");
  const int64_t M = x.size(0), N = weight.size(0);
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "out [M, N]");
  torch::Tensor bias_c = bias.has_value() ? bias->contiguous() : torch::Tensor();
  torch::Tensor other_c = other.has_value() ? other->contiguous() : torch::Tensor();
  TORCH_CHECK(!bias.has_value() || bias_c.numel() == N, "bias [N]");
  TORCH_CHECK(!other.has_value() || (other_c.size(0) == M && other_c.size(1) == N), "other [M, N]");
  const Problem problem{x.data_ptr<float>(), weight.data_ptr<float>(),
                        bias.has_value() ? bias_c.data_ptr<float>() : nullptr,
                        other.has_value() ? other_c.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                        x.size(1), N, static_cast<Epilogue>(epilogue)};
  const int64_t full_tiles = N / kTileN;
  // A thread takes a contiguous run of tiles, so its weight rows stream front to back.
  at::parallel_for(0, full_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* prefetch = t + kPrefetchTiles < end ? problem.w + (t + kPrefetchTiles) * kTileN * problem.K : nullptr;
      weight_rows<kTileN>(problem, M, t * kTileN, prefetch);
    }
  });
  for (int64_t n = full_tiles * kTileN; n < N; ++n) weight_rows<1>(problem, M, n, nullptr);
}
