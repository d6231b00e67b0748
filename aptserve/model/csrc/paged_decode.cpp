// Decode attention that reads K and V in place from the paged cache (CPU; fp32 queries, fp32 or bf16 cache rows).
//
// One query token per request attends over its context, whose K rows live in the units k_units[b][j] and V rows
// in v_units[b][j] (block j, `block_size` rows each, row = kv_dim values, the KV head h at columns
// [h * head_dim, (h + 1) * head_dim)); the query heads of one KV head (GQA) share its rows. Each K and V row is
// read once. Softmax is computed online (running max and sum), so nothing the size of the context is
// materialised.
#include <ATen/core/Tensor.h>

#include "attention_common.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace {
// How many blocks ahead K and V are prefetched (memory latency is what bounds this kernel).
constexpr int64_t kPrefetchBlocks = 2;

using aptserve::dot;
using aptserve::kLanes;
using aptserve::kNoScore;
using aptserve::bf16_bits;
using aptserve::load;
using aptserve::scale_add;
using aptserve::store;
using aptserve::Vec;

// One block of one request's context: its K and V rows (of the cache's type T) and the request's query heads.
template <typename T>
struct Block {
  const float* q;   // [num_heads, head_dim]
  const T* k_rows;  // rows x kv_dim
  const T* v_rows;
  int64_t rows, num_heads, group, head_dim, kv_dim, block_size;
  const T* k_ahead;  // the K and V units a few blocks on (nullptr at the end): fetched a row at a time
  const T* v_ahead;
};

// A row of the units ahead, fetched while this block's row is used: spread over the block, the fetches keep
// memory busy while the cores compute (fetched all at once, they stalled it and left it idle in between).
template <typename T>
inline void prefetch_ahead(const Block<T>& b, int64_t t) {
  if (b.k_ahead == nullptr) return;
  for (int64_t i = 0; i < b.kv_dim; i += 64 / sizeof(T)) {
    __builtin_prefetch(b.k_ahead + t * b.kv_dim + i, 0, 3);
    __builtin_prefetch(b.v_ahead + t * b.kv_dim + i, 0, 3);
  }
}

// scores[h * block_size + t] = scale * q_h . k_t, any head_dim.
template <typename T>
void scores_any(const Block<T>& b, float scale, float* scores) {
  for (int64_t t = 0; t < b.rows; ++t) {
    prefetch_ahead(b, t);
    for (int64_t h = 0; h < b.num_heads; ++h) {
      const T* k = b.k_rows + t * b.kv_dim + (h / b.group) * b.head_dim;
      scores[h * b.block_size + t] = scale * dot(b.q + h * b.head_dim, k, b.head_dim);
    }
  }
}

// acc_h = acc_h * correction[h] + sum_t p[h, t] v_t, any head_dim.
template <typename T>
void values_any(const Block<T>& b, const float* probs, const float* correction, float* acc) {
  for (int64_t h = 0; h < b.num_heads; ++h)
    for (int64_t i = 0; i < b.head_dim; ++i) acc[h * b.head_dim + i] *= correction[h];
  for (int64_t t = 0; t < b.rows; ++t)
    for (int64_t h = 0; h < b.num_heads; ++h)
      scale_add(acc + h * b.head_dim, b.v_rows + t * b.kv_dim + (h / b.group) * b.head_dim, probs[h * b.block_size + t],
                b.head_dim);
}

// The same for head_dim = C vectors: no integer division per row, the dot keeps two short chains instead of one
// long one, and a head's accumulator stays in registers across the block's rows (the loops above were bound by
// these: 11 GB/s with the cache hot, below what memory gives).
template <int C, typename T>
void scores_vec(const Block<T>& b, float scale, float* scores) {
  const int64_t num_kv_heads = b.num_heads / b.group;
  for (int64_t t = 0; t < b.rows; ++t) {
    prefetch_ahead(b, t);
    for (int64_t g = 0; g < num_kv_heads; ++g) {
      const T* k = b.k_rows + t * b.kv_dim + g * C * kLanes;
      for (int64_t h = g * b.group; h < (g + 1) * b.group; ++h) {
        const float* q = b.q + h * C * kLanes;
        Vec even = {}, odd = {};
        for (int c = 0; c + 1 < C; c += 2) {
          even += load(q + c * kLanes) * load(k + c * kLanes);
          odd += load(q + (c + 1) * kLanes) * load(k + (c + 1) * kLanes);
        }
        if (C % 2) even += load(q + (C - 1) * kLanes) * load(k + (C - 1) * kLanes);
        scores[h * b.block_size + t] = scale * aptserve::lanes_sum(even + odd);
      }
    }
  }
}

template <int C, typename T>
void values_vec(const Block<T>& b, const float* probs, const float* correction, float* acc) {
  for (int64_t h = 0; h < b.num_heads; ++h) {
    const int64_t g = h / b.group;  // once per head and block, not per row
    float* acc_h = acc + h * C * kLanes;
    Vec sum[C];
    for (int c = 0; c < C; ++c) sum[c] = load(acc_h + c * kLanes) * correction[h];
    for (int64_t t = 0; t < b.rows; ++t) {
      const float p = probs[h * b.block_size + t];
      const T* v = b.v_rows + t * b.kv_dim + g * C * kLanes;
      for (int c = 0; c < C; ++c) sum[c] += p * load(v + c * kLanes);
    }
    for (int c = 0; c < C; ++c) store(acc_h + c * kLanes, sum[c]);
  }
}

template <typename T>
using ScoresFn = void (*)(const Block<T>&, float, float*);
template <typename T>
using ValuesFn = void (*)(const Block<T>&, const float*, const float*, float*);

template <typename T>
std::pair<ScoresFn<T>, ValuesFn<T>> block_functions(int64_t head_dim) {
  if (head_dim % kLanes == 0) {
    switch (head_dim / kLanes) {
      case 2: return {scores_vec<2, T>, values_vec<2, T>};
      case 4: return {scores_vec<4, T>, values_vec<4, T>};
      case 8: return {scores_vec<8, T>, values_vec<8, T>};
      case 16: return {scores_vec<16, T>, values_vec<16, T>};
    }
  }
  return {scores_any<T>, values_any<T>};
}

// Softmax over the block, online: exponentiates scores in place into weights, and gives each head the factor its
// accumulator (summed under the old running max) is rescaled by.
void online_softmax(float* scores, int64_t rows, int64_t num_heads, int64_t block_size, float* running_max,
                    float* running_sum, float* correction) {
  for (int64_t h = 0; h < num_heads; ++h) {
    float* s = scores + h * block_size;
    float block_max = running_max[h];
    for (int64_t t = 0; t < rows; ++t) block_max = std::max(block_max, s[t]);
    float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t t = 0; t < rows; ++t) {
      s[t] = std::exp(s[t] - block_max);
      block_sum += s[t];
    }
    correction[h] = std::exp(running_max[h] - block_max);
    running_sum[h] = running_sum[h] * correction[h] + block_sum;
    running_max[h] = block_max;
  }
}
template <typename T>
void attend(at::Tensor out, at::Tensor query, const T* kv, at::Tensor cache, at::Tensor k_units, at::Tensor v_units,
            at::Tensor context_lens, double scale, int64_t num_kv_heads) {
  const int64_t num_requests = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = cache.size(1), kv_dim = cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = k_units.size(1);
  TORCH_CHECK(kv_dim == num_kv_heads * head_dim && num_heads % num_kv_heads == 0, "head layout");
  const float* q = query.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* k_table = k_units.contiguous().data_ptr<int64_t>();
  const int64_t* v_table = v_units.contiguous().data_ptr<int64_t>();
  const int64_t* lens = context_lens.contiguous().data_ptr<int64_t>();
  const float qk_scale = static_cast<float>(scale);
  const auto [block_scores, block_values] = block_functions<T>(head_dim);

  // One work item per request: its K and V units are read front to back, whole rows (every KV head) at a time,
  // which the hardware prefetcher streams; the next block's units are prefetched while this one is used.
  at::parallel_for(0, num_requests, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(num_heads * head_dim), scores(num_heads * block_size), running_max(num_heads),
        running_sum(num_heads), correction(num_heads);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(running_max.begin(), running_max.end(), kNoScore);
      std::fill(running_sum.begin(), running_sum.end(), 0.f);
      const int64_t num_blocks = std::min(max_blocks, (len + block_size - 1) / block_size);
      for (int64_t block = 0; block < num_blocks; ++block) {
        const bool ahead = block + kPrefetchBlocks < num_blocks;
        const int64_t next = b * max_blocks + block + kPrefetchBlocks;
        const Block<T> unit{q + b * num_heads * head_dim, kv + k_table[b * max_blocks + block] * block_size * kv_dim,
                         kv + v_table[b * max_blocks + block] * block_size * kv_dim,
                         std::min(block_size, len - block * block_size), num_heads, group, head_dim, kv_dim, block_size,
                         ahead ? kv + k_table[next] * block_size * kv_dim : nullptr,
                         ahead ? kv + v_table[next] * block_size * kv_dim : nullptr};
        block_scores(unit, qk_scale, scores.data());
        online_softmax(scores.data(), unit.rows, num_heads, block_size, running_max.data(), running_sum.data(),
                       correction.data());
        block_values(unit, scores.data(), correction.data(), acc.data());
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* dst = o + (b * num_heads + h) * head_dim;
        const float inv = running_sum[h] > 0.f ? 1.f / running_sum[h] : 0.f;
#pragma omp simd
        for (int64_t i = 0; i < head_dim; ++i) dst[i] = acc[h * head_dim + i] * inv;
      }
    }
  });
}
}  // namespace

void paged_decode_attention(at::Tensor out, at::Tensor query, at::Tensor cache, at::Tensor k_units,
                            at::Tensor v_units, at::Tensor context_lens, double scale, int64_t num_kv_heads) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "fp32 queries and output");
  TORCH_CHECK(query.is_contiguous() && cache.is_contiguous() && out.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(k_units.scalar_type() == at::kLong && v_units.scalar_type() == at::kLong &&
                  context_lens.scalar_type() == at::kLong, "int64 tables");
  if (cache.scalar_type() == at::kFloat) {
    attend(out, query, cache.data_ptr<float>(), cache, k_units, v_units, context_lens, scale, num_kv_heads);
  } else {
    TORCH_CHECK(cache.scalar_type() == at::kBFloat16, "an fp32 or bf16 cache");
    const auto* rows = reinterpret_cast<const bf16_bits*>(cache.data_ptr<at::BFloat16>());
    attend(out, query, rows, cache, k_units, v_units, context_lens, scale, num_kv_heads);
  }
}
