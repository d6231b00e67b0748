// Decode attention that reads K and V in place from the paged cache (CPU, fp32).
//
// One query token per request attends over its context, whose K rows live in the units k_units[b][j] and V rows
// in v_units[b][j] (block j, `block_size` rows each, row = kv_dim values, the KV head h at columns
// [h * head_dim, (h + 1) * head_dim)); the query heads of one KV head (GQA) share its rows. Each K and V row is
// read once. Softmax is computed online (running max and sum), so nothing the size of the context is
// materialised.
#include <torch/extension.h>

#include "attention_common.h"

#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {
// How many blocks ahead K and V are prefetched (memory latency is what bounds this kernel).
constexpr int64_t kPrefetchBlocks = 2;
}  // namespace


using aptserve::dot;
using aptserve::kNoScore;
using aptserve::prefetch_unit;
using aptserve::scale_add;

void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor cache, torch::Tensor k_units,
                            torch::Tensor v_units, torch::Tensor context_lens, double scale, int64_t num_kv_heads) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat && cache.scalar_type() == torch::kFloat, "fp32 only");
  TORCH_CHECK(query.is_contiguous() && cache.is_contiguous() && out.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(k_units.scalar_type() == torch::kLong && v_units.scalar_type() == torch::kLong &&
                  context_lens.scalar_type() == torch::kLong, "int64 tables");
  const int64_t num_requests = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = cache.size(1), kv_dim = cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = k_units.size(1);
  TORCH_CHECK(kv_dim == num_kv_heads * head_dim && num_heads % num_kv_heads == 0, "head layout");
  const float* q = query.data_ptr<float>();
  const float* kv = cache.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t* k_table = k_units.contiguous().data_ptr<int64_t>();
  const int64_t* v_table = v_units.contiguous().data_ptr<int64_t>();
  const int64_t* lens = context_lens.contiguous().data_ptr<int64_t>();
  const float qk_scale = static_cast<float>(scale);

  // One work item per request: its K and V units are read front to back, whole rows (every KV head) at a time,
  // which the hardware prefetcher streams; the next block's units are prefetched while this one is used.
  at::parallel_for(0, num_requests, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(num_heads * head_dim), scores(num_heads * block_size), running_max(num_heads),
        running_sum(num_heads);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      const float* q_req = q + b * num_heads * head_dim;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(running_max.begin(), running_max.end(), kNoScore);
      std::fill(running_sum.begin(), running_sum.end(), 0.f);
      const int64_t num_blocks = std::min(max_blocks, (len + block_size - 1) / block_size);
      for (int64_t block = 0; block < num_blocks; ++block) {
        const int64_t rows = std::min(block_size, len - block * block_size);
        const float* k_rows = kv + k_table[b * max_blocks + block] * block_size * kv_dim;
        const float* v_rows = kv + v_table[b * max_blocks + block] * block_size * kv_dim;
        if (block + kPrefetchBlocks < num_blocks) {
          const int64_t ahead = b * max_blocks + block + kPrefetchBlocks;
          prefetch_unit(kv + k_table[ahead] * block_size * kv_dim, block_size * kv_dim);
          prefetch_unit(kv + v_table[ahead] * block_size * kv_dim, block_size * kv_dim);
        }
        for (int64_t t = 0; t < rows; ++t) {
          for (int64_t h = 0; h < num_heads; ++h) {
            const float* k = k_rows + t * kv_dim + (h / group) * head_dim;
            scores[h * block_size + t] = qk_scale * dot(q_req + h * head_dim, k, head_dim);
          }
        }
        for (int64_t h = 0; h < num_heads; ++h) {  // online softmax: rescale what was summed under the old max
          float* s = scores.data() + h * block_size;
          float block_max = running_max[h];
          for (int64_t t = 0; t < rows; ++t) block_max = std::max(block_max, s[t]);
          float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
          for (int64_t t = 0; t < rows; ++t) {
            s[t] = std::exp(s[t] - block_max);
            block_sum += s[t];
          }
          const float correction = std::exp(running_max[h] - block_max);
          running_sum[h] = running_sum[h] * correction + block_sum;
          running_max[h] = block_max;
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t i = 0; i < head_dim; ++i) a[i] *= correction;
        }
        for (int64_t t = 0; t < rows; ++t) {
          for (int64_t h = 0; h < num_heads; ++h) {
            const float* v = v_rows + t * kv_dim + (h / group) * head_dim;
            scale_add(acc.data() + h * head_dim, v, scores[h * block_size + t], head_dim);
          }
        }
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
