// Causal attention of a bf16 prefill chunk on CPUs with AVX-512 BF16, flash-style: vdpbf16ps products, fp32 sums.
// (An fp32 twin with FMAs drew even with torch's SDPA at 1,024 tokens and lost at 2,048, so fp32 keeps torch's.)
//
// A chunk's T queries sit at absolute positions offset .. offset + T - 1 and attend to the S = offset + T keys
// before and at them (offset 0: a prompt's first chunk over its own K/V; otherwise K/V gathered from the cache).
// Work items are (KV head, block of kQueryRows queries); the query heads of one KV head (GQA) share each K/V tile
// read. Per key tile of kKeys keys: scores Q K^T (K packed once per call so that a tile's keys lie across the
// vector lanes), an online softmax in fp32, then P V (V packed so that a key's dims lie across the lanes; P is
// rounded to bf16 as it is multiplied). Only the tiles at or below the diagonal are computed. The dtypes built
// for this CPU are listed by prefill_attention_dtypes; for the others torch's SDPA runs instead.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include "attention_common.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {
constexpr int64_t kKeys = 32;       // keys per tile: two 16-lane score vectors per query row
constexpr int64_t kQueryRows = 16;  // query positions per work item
constexpr int kRowsAtOnce = 4;      // query rows whose scores share each K load (a fixed count, so that the
                                    // accumulators stay in registers; a last partial group is padded)
using aptserve::kNoScore;

// bf16 (as its bits): a K tile is [dim pair][key][2] (a pair's two dims side by side, as vdpbf16ps takes them), a V
// tile [key pair][dim][2]; one vdpbf16ps per two value pairs, P rounded to bf16.
struct Bf16 {
  using T = uint16_t;
  using Probs = uint32_t;  // keys 2j and 2j + 1 of a row's tile weights as one bf16 pair
  static constexpr int64_t kProbsPerRow = kKeys / 2;

  static void pack(const T* src, int64_t key, int64_t head_dim, T* tile, bool as_values) {
    for (int64_t d = 0; d < head_dim; ++d)
      (as_values ? tile[((key / 2) * head_dim + d) * 2 + key % 2] : tile[((d / 2) * kKeys + key) * 2 + d % 2]) = src[d];
  }

  static void scores(const T* const* q_rows, const T* k_tile, int64_t head_dim, __m512 acc[kRowsAtOnce][2]) {
    for (int64_t pair = 0; pair < head_dim / 2; ++pair) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k_tile + pair * kKeys * 2);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(k_tile + pair * kKeys * 2 + 32);
      for (int r = 0; r < kRowsAtOnce; ++r) {
        uint32_t bits;
        std::memcpy(&bits, q_rows[r] + 2 * pair, sizeof(bits));
        const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], q, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], q, k1);
      }
    }
  }

  template <int C>
  static void values(const Probs* const* p_rows, const T* v_tile, __m512 acc[kRowsAtOnce][C]) {
    for (int64_t pair = 0; pair < kKeys / 2; ++pair) {
      __m512bh v[C];
      for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_loadu_si512(v_tile + (pair * C * 16 + c * 16) * 2);
      for (int r = 0; r < kRowsAtOnce; ++r) {
        const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(p_rows[r][pair]));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], p, v[c]);
      }
    }
  }

  // Key k's weight is bf16 element k: the 32-bit lane j holds keys 2j and 2j + 1, the pair vdpbf16ps takes.
  static void store_probs(__m512 e0, __m512 e1, Probs* probs) {
    _mm512_storeu_si512(probs, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }

  static T from_float(float x) {  // round to nearest even (no NaNs here)
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return static_cast<T>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
  }
};

// One KV head's K (or V) as tiles of kKeys keys in the dtype's layout, keys past the end zero.
template <typename D>
void pack_tiles(const typename D::T* src, int64_t stride, int64_t num_keys, int64_t head_dim, typename D::T* tiles,
                bool as_values) {
  const int64_t num_tiles = (num_keys + kKeys - 1) / kKeys, tile_size = kKeys * head_dim;
  std::fill(tiles, tiles + num_tiles * tile_size, typename D::T{0});
  for (int64_t j = 0; j < num_keys; ++j)
    D::pack(src + j * stride, j % kKeys, head_dim, tiles + (j / kKeys) * tile_size, as_values);
}

// scores[r][0..kKeys) = q_r . k over one K tile, for kRowsAtOnce query rows.
template <typename D>
inline void tile_scores(const typename D::T* const* q_rows, const typename D::T* k_tile, int64_t head_dim,
                        float* scores) {
  __m512 acc[kRowsAtOnce][2];
  for (int r = 0; r < kRowsAtOnce; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  D::scores(q_rows, k_tile, head_dim, acc);
  for (int r = 0; r < kRowsAtOnce; ++r) {
    _mm512_storeu_ps(scores + r * kKeys, acc[r][0]);
    _mm512_storeu_ps(scores + r * kKeys + 16, acc[r][1]);
  }
}

// out_r[0..head_dim) += sum over the tile's keys of p_r[key] v[key], for kRowsAtOnce rows.
template <typename D, int C>  // C = head_dim / 16
inline void tile_values(const typename D::Probs* const* p_rows, const typename D::T* v_tile, float* const* out_rows) {
  __m512 acc[kRowsAtOnce][C];
  for (int r = 0; r < kRowsAtOnce; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(out_rows[r] + 16 * c);
  D::template values<C>(p_rows, v_tile, acc);
  for (int r = 0; r < kRowsAtOnce; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out_rows[r] + 16 * c, acc[r][c]);
}

// e^x for x <= 0 (Cephes' single-precision polynomial on x - n ln2, scaled by 2^n): 1e-7 relative, far below the
// bf16 rounding the probabilities get next.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// One row's online softmax over a tile of kKeys scores, of which the first `visible` count: updates the running max
// and sum, rescales the row's accumulator and writes the tile's weights for tile_values.
template <typename D>
inline void softmax_tile(const float* scores, int64_t visible, float scale, float& running_max, float& running_sum,
                         float* acc, int64_t head_dim, typename D::Probs* probs) {
  const __mmask16 low = visible >= 16 ? 0xffff : visible <= 0 ? 0 : (1u << visible) - 1;
  const __mmask16 high = visible >= kKeys ? 0xffff : visible <= 16 ? 0 : (1u << (visible - 16)) - 1;
  const __m512 none = _mm512_set1_ps(kNoScore), scale_v = _mm512_set1_ps(scale);
  const __m512 s0 = _mm512_mask_mul_ps(none, low, _mm512_loadu_ps(scores), scale_v);
  const __m512 s1 = _mm512_mask_mul_ps(none, high, _mm512_loadu_ps(scores + 16), scale_v);
  const float tile_max = std::max(running_max, _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
  const __m512 max_v = _mm512_set1_ps(tile_max);
  const __m512 e0 = _mm512_maskz_mov_ps(low, exp_nonpositive(_mm512_sub_ps(s0, max_v)));
  const __m512 e1 = _mm512_maskz_mov_ps(high, exp_nonpositive(_mm512_sub_ps(s1, max_v)));
  const float correction = std::exp(running_max - tile_max);
  running_sum = running_sum * correction + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
  running_max = tile_max;
  if (correction != 1.f) {
    const __m512 c = _mm512_set1_ps(correction);
    for (int64_t d = 0; d < head_dim; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), c));
  }
  D::store_probs(e0, e1, probs);
}

template <typename D, int C>
void attend(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value, int64_t offset, double scale) {
  using T = typename D::T;
  const int64_t num_queries = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_keys = key.size(0), num_kv_heads = key.size(1), group = num_heads / num_kv_heads;
  const int64_t num_tiles = (num_keys + kKeys - 1) / kKeys, tile_size = kKeys * head_dim;
  const auto* q = static_cast<const T*>(query.data_ptr());
  const auto* k = static_cast<const T*>(key.data_ptr());
  const auto* v = static_cast<const T*>(value.data_ptr());
  auto* o = static_cast<T*>(out.data_ptr());
  const int64_t kv_stride = key.stride(0);

  std::vector<T> k_tiles(num_kv_heads * num_tiles * tile_size), v_tiles(k_tiles.size());
  at::parallel_for(0, num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      pack_tiles<D>(k + g * head_dim, kv_stride, num_keys, head_dim, k_tiles.data() + g * num_tiles * tile_size, false);
      pack_tiles<D>(v + g * head_dim, value.stride(0), num_keys, head_dim, v_tiles.data() + g * num_tiles * tile_size,
                 true);
    }
  });

  const int64_t num_blocks = (num_queries + kQueryRows - 1) / kQueryRows;
  const float qk_scale = static_cast<float>(scale);
  // Items ordered (last block, first block, second last, second, ...) per KV head: a block's cost grows with its
  // position, and at::parallel_for hands each thread a contiguous range, so alternating keeps the threads even.
  at::parallel_for(0, num_kv_heads * num_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = kQueryRows * group + kRowsAtOnce;  // + the padding rows of a last partial group
    std::vector<float> scores(rows_max * kKeys), acc(rows_max * head_dim, 0.f), running_max(rows_max),
        running_sum(rows_max);
    std::vector<typename D::Probs> probs(rows_max * D::kProbsPerRow, 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / num_blocks, nth = item % num_blocks;
      const int64_t block = nth % 2 == 0 ? num_blocks - 1 - nth / 2 : nth / 2;
      const int64_t first = block * kQueryRows, count = std::min(kQueryRows, num_queries - first);
      const int64_t rows = count * group;  // row r: query first + r / group, head g * group + r % group
      std::fill(acc.begin(), acc.begin() + rows * head_dim, 0.f);
      std::fill(running_max.begin(), running_max.begin() + rows, kNoScore);
      std::fill(running_sum.begin(), running_sum.begin() + rows, 0.f);
      const int64_t last_key = offset + first + count - 1;  // the last row's own position
      const T* k_head = k_tiles.data() + g * num_tiles * tile_size;
      const T* v_head = v_tiles.data() + g * num_tiles * tile_size;
      for (int64_t tile = 0; tile * kKeys <= last_key; ++tile) {
        const int64_t key0 = tile * kKeys;
        for (int64_t r0 = 0; r0 < rows; r0 += kRowsAtOnce) {
          const T* q_rows[kRowsAtOnce];
          for (int r = 0; r < kRowsAtOnce; ++r) {
            const int64_t row = std::min(r0 + r, rows - 1);  // padding repeats the last row
            q_rows[r] = q + ((first + row / group) * num_heads + g * group + row % group) * head_dim;
          }
          tile_scores<D>(q_rows, k_head + tile * tile_size, head_dim, scores.data() + r0 * kKeys);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t visible = offset + first + r / group - key0 + 1;  // keys up to the row's own position
          softmax_tile<D>(scores.data() + r * kKeys, std::min(visible, kKeys), qk_scale, running_max[r], running_sum[r],
                       acc.data() + r * head_dim, head_dim, probs.data() + r * D::kProbsPerRow);
        }
        for (int64_t r0 = 0; r0 < rows; r0 += kRowsAtOnce) {
          const typename D::Probs* p_rows[kRowsAtOnce];
          float* out_rows[kRowsAtOnce];
          for (int r = 0; r < kRowsAtOnce; ++r) {  // rows past the end: the padding rows of the buffers
            p_rows[r] = probs.data() + (r0 + r) * D::kProbsPerRow;
            out_rows[r] = acc.data() + (r0 + r) * head_dim;
          }
          tile_values<D, C>(p_rows, v_head + tile * tile_size, out_rows);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = o + ((first + r / group) * num_heads + g * group + r % group) * head_dim;
        const float inv = 1.f / running_sum[r];  // every row sees at least its own key
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = D::from_float(acc[r * head_dim + d] * inv);
      }
    }
  });
}

template <typename D>
void dispatch(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value, int64_t offset, double scale) {
  switch (query.size(2)) {
    case 32: return attend<D, 2>(out, query, key, value, offset, scale);
    case 64: return attend<D, 4>(out, query, key, value, offset, scale);
    case 128: return attend<D, 8>(out, query, key, value, offset, scale);
  }
  TORCH_CHECK(false, "head_dim 32, 64 or 128");
}
}  // namespace

std::vector<std::string> prefill_attention_dtypes() { return {"bfloat16"}; }

void prefill_attention(at::Tensor out, at::Tensor query, at::Tensor key, at::Tensor value, int64_t offset,
                       double scale) {
  const auto dtype = query.scalar_type();
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype && out.scalar_type() == dtype,
              "one dtype for q, k, v and out");
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous() && key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.stride(1) == key.size(2) && value.stride(1) == value.size(2), "rows of heads, dims contiguous");
  TORCH_CHECK(key.size(0) == offset + query.size(0) && value.sizes() == key.sizes(),
              "keys: the context, then the chunk");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "head layout");
  TORCH_CHECK(dtype == at::kBFloat16, "a dtype of prefill_attention_dtypes()");
  dispatch<Bf16>(out, query, key, value, offset, scale);
}

#else  // no AVX-512 BF16: the caller keeps torch's SDPA

std::vector<std::string> prefill_attention_dtypes() { return {}; }

void prefill_attention(at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, double) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}

#endif
