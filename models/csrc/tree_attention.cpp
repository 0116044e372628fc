// Paged attention of decode and tree-verification queries on the CPU (fp32, AVX2).
//
// Sequence b's queries are packed rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1; it holds
// seq_lens[b] keys, read through its block table: the cached history, then its n new tokens
// (a tree's nodes, or one decode token). Query i sees the whole history and the new tokens
// whose bit is set in its tree_mask word (its ancestors and itself). Keys and values are
// read in place from the paged cache (no gather copy); one task per (query row, KV head)
// serves that head's group of query heads (grouped-query attention).
//
// Exact softmax in passes over the visible keys: scores, their max, the exponentials and
// their sum, the weighted values. Hidden keys are skipped, not masked to zero, and every
// pass is a fixed function of the visible keys in order, so a query's result depends only
// on the keys it sees: a token verified in a tree gets the same bits as the same token
// decoded alone (with a history computed the same way), whatever else the step holds.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Sum of a[d] * b[d] over d < D (a multiple of 8), in a fixed order.
inline float hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// scores[i] = scale * (q . keys[i]) for i < count, four keys at a time (four independent
// FMA chains); each key's sum runs over d in the same order whatever its neighbours.
void dots(const float* q, const float* k, const int64_t* slots, int64_t count, int64_t D, float scale,
          float* scores) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const float *k0 = k + slots[i] * D, *k1 = k + slots[i + 1] * D, *k2 = k + slots[i + 2] * D,
                *k3 = k + slots[i + 3] * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k1 + d), a1);
      a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k2 + d), a2);
      a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k3 + d), a3);
    }
    scores[i] = hsum(a0) * scale;
    scores[i + 1] = hsum(a1) * scale;
    scores[i + 2] = hsum(a2) * scale;
    scores[i + 3] = hsum(a3) * scale;
  }
  for (; i < count; ++i) {
    const float* ki = k + slots[i] * D;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(ki + d), a);
    scores[i] = hsum(a) * scale;
  }
}

// e^x for 8 lanes, x <= 0 (a score minus the maximum): 2^n * e^r with n = round(x log2 e),
// |r| <= ln 2 / 2, e^r by a degree-6 polynomial; below -87 the result is 0.
inline __m256 exp8(__m256 x) {
  const __m256 floor_ = _mm256_set1_ps(-87.0f);
  const __m256 zero_mask = _mm256_cmp_ps(x, floor_, _CMP_GE_OQ);
  x = _mm256_max_ps(x, floor_);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);     // ln 2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), zero_mask);
}

// p[i] = e^(scores[i] - top) in place; returns their sum (eight lanes by i mod 8, then the
// lanes in a fixed order).
float exponentials(float* p, int64_t count, float top) {
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), top8));
    _mm256_storeu_ps(p + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  if (i < count) {  // the tail through a padded lane buffer (its spare lanes add zero)
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t rest = count - i;
    for (int64_t j = 0; j < 8; ++j) tail[j] = j < rest ? p[i + j] - top : -INFINITY;
    const __m256 e = exp8(_mm256_load_ps(tail));
    _mm256_store_ps(tail, e);
    for (int64_t j = 0; j < rest; ++j) p[i + j] = tail[j];
    sum8 = _mm256_add_ps(sum8, e);
  }
  return hsum(sum8);
}

// out[d] = sum_i p[i] v_i[d] / sum, keys in order, 32 output lanes at a time in registers.
void weighted_values(const float* p, const float* v, const int64_t* slots, int64_t count, int64_t D,
                     float sum, float* out) {
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int64_t lanes = std::min<int64_t>(32, D - d0) / 8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < count; ++i) {
      const __m256 pi = _mm256_set1_ps(p[i]);
      const float* vi = v + slots[i] * D + d0;
      for (int64_t j = 0; j < lanes; ++j) acc[j] = _mm256_fmadd_ps(pi, _mm256_loadu_ps(vi + 8 * j), acc[j]);
    }
    for (int64_t j = 0; j < lanes; ++j) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
  }
}

}  // namespace

// out, q [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, W]
// int32; seq_lens [B] int32; cu_seqlens_q [B + 1] int32; tree_mask [T - first_tree_row] int64.
// Writes the rows of sequences first_seq .. B - 1 (zeros for padding sequences, seq_len 0).
void tree_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                    const torch::Tensor& seq_lens, const torch::Tensor& cu_seqlens_q,
                    const torch::Tensor& tree_mask, int64_t first_seq, int64_t first_tree_row, double scale) {
  for (const torch::Tensor* t : {static_cast<const torch::Tensor*>(&out), &q, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "out, q and the caches must be contiguous fp32 CPU tensors");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q, out [T, Hq, D] and caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && seq_lens.scalar_type() == torch::kInt &&
              cu_seqlens_q.scalar_type() == torch::kInt && tree_mask.scalar_type() == torch::kLong &&
              block_tables.is_contiguous() && seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous() &&
              tree_mask.is_contiguous(), "metadata must be contiguous int32 (tree_mask int64)");
  const int64_t Hq = q.size(1), D = q.size(2), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0 && Hq % Hkv == 0, "head sizes do not match");
  const int64_t B = seq_lens.size(0), W = block_tables.size(1), group = Hq / Hkv;
  TORCH_CHECK(block_tables.size(0) == B && cu_seqlens_q.size(0) == B + 1 && first_seq >= 0 && first_seq <= B,
              "metadata sizes do not match");
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* masks = tree_mask.data_ptr<int64_t>();
  const float* qd = q.data_ptr<float>();
  const float* kd = k_cache.data_ptr<float>();
  const float* vd = v_cache.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t first_row = cu[first_seq], rows = cu[B] - first_row;
  TORCH_CHECK(first_row >= first_tree_row && cu[B] <= q.size(0) && cu[B] - first_tree_row <= tree_mask.size(0),
              "cu_seqlens_q does not match q or tree_mask");
  for (int64_t b = first_seq; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    TORCH_CHECK(n >= 0 && n <= 64 && (lens[b] == 0 || (lens[b] >= n && (lens[b] + block_size - 1) / block_size <= W)),
                "sequence ", b, ": ", n, " queries and ", lens[b], " keys do not fit its block table");
  }
  at::parallel_for(0, rows * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> slots;
    int64_t b = first_seq;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = first_row + task / Hkv, h = task % Hkv;
      while (cu[b + 1] <= row) ++b;
      const int64_t len = lens[b], n = cu[b + 1] - cu[b], history = len - n;
      float* o = od + (row * Hq + h * group) * D;
      if (len == 0) {  // a padding sequence
        std::fill(o, o + group * D, 0.0f);
        continue;
      }
      const uint64_t mask = static_cast<uint64_t>(masks[row - first_tree_row]);
      const int32_t* table = tables + b * W;
      slots.clear();
      for (int64_t t = 0; t < len; ++t)
        if (t < history || ((mask >> (t - history)) & 1))
          slots.push_back((static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size) * Hkv + h);
      const int64_t visible = static_cast<int64_t>(slots.size());
      if (visible == 0) {  // a query that sees nothing (an empty mask word): no attention
        std::fill(o, o + group * D, 0.0f);
        continue;
      }
      scores.resize(visible);
      for (int64_t g = 0; g < group; ++g) {
        const float* qh = qd + (row * Hq + h * group + g) * D;
        dots(qh, kd, slots.data(), visible, D, static_cast<float>(scale), scores.data());
        const float top = *std::max_element(scores.begin(), scores.end());
        const float sum = exponentials(scores.data(), visible, top);
        weighted_values(scores.data(), vd, slots.data(), visible, D, sum, o + g * D);
      }
    }
  });
}
