// Paged attention of decode and tree-verification queries on the CPU (fp32 arithmetic, AVX2;
// the cache in fp32 or fp16, widened exactly on load).
//
// Sequence b's queries are packed rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1; it holds
// seq_lens[b] keys, read through its block table: the cached history, then its n new tokens
// (a tree's nodes, or one decode token). Query i sees the whole history and the new tokens
// whose bit is set in its tree_mask word (its ancestors and itself). Keys and values are
// read in place from the paged cache (no gather copy), once per (sequence, query head) for
// all of the sequence's queries; grouped-query attention maps query head to KV head. The
// history's scores take eight keys at a time, reduced together (dots8).
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

#include "simd.h"

namespace {

// Eight cache elements as fp32 lanes (fp16 widens exactly: the arithmetic after is the same).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// out[r * ldo] = scale * (q_r . k) for the rows r < count of q (row stride ldq), four rows at
// a time sharing each load of k; each row's sum runs over d in the same order whatever its
// neighbours.
template <typename T>
void dots(const T* k, const float* q, int64_t ldq, int64_t count, int64_t D, float scale, float* out,
          int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float *q0 = q + r * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kd = load8(k + d);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kd, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), kd, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), kd, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), kd, a3);
    }
    out[r * ldo] = hsum(a0) * scale;
    out[(r + 1) * ldo] = hsum(a1) * scale;
    out[(r + 2) * ldo] = hsum(a2) * scale;
    out[(r + 3) * ldo] = hsum(a3) * scale;
  }
  for (; r < count; ++r) {
    const float* qr = q + r * ldq;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8(k + d), a);
    out[r * ldo] = hsum(a) * scale;
  }
}

// out[j] = scale * (q . k_j) for eight keys j (k[j] their rows): eight accumulators, reduced
// together by horizontal adds in the order hsum takes, so a key's score has the same bits
// as dots gives it (one query of four or one alone), at a fraction of eight hsums' cost.
template <typename T>
void dots8(const T* const* k, const float* q, int64_t D, float scale, float* out) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qd, load8(k[j] + d), a[j]);
  }
  // lane i of hadd(hadd(a0, a1), hadd(a2, a3)) is key i's (l0 + l1) + (l2 + l3) in the low
  // half and its (l4 + l5) + (l6 + l7) in the high half (keys 4..7 likewise)
  const __m256 first = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 second = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(first, second, 0x20),
                                    _mm256_permute2f128_ps(first, second, 0x31));
  _mm256_storeu_ps(out, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
}

// acc[d] += p * v[d] for d < D (a multiple of 8).
template <typename T>
inline void axpy(float p, const T* v, float* acc, int64_t D) {
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t d = 0; d < D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8(v + d), _mm256_loadu_ps(acc + d)));
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

// The rows of sequences first_seq .. B - 1, the cache's elements of type T (see tree_attention).
template <typename T>
void attend(float* od, const float* qd, const T* kd, const T* vd, const int32_t* cu, const int32_t* lens,
            const int32_t* tables, const int64_t* masks, int64_t B, int64_t W, int64_t first_seq,
            int64_t first_tree_row, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size, double scale) {
  const int64_t group = Hq / Hkv;
  // each key's row in the cache for KV head 0 (slot * Hkv), sequence after sequence: once for
  // all heads, block by block (no division per key)
  std::vector<int64_t> key_start(B + 1, 0);
  for (int64_t b = first_seq; b < B; ++b) key_start[b + 1] = key_start[b] + lens[b];
  std::vector<int64_t> key_rows(key_start[B]);
  for (int64_t b = first_seq; b < B; ++b) {
    int64_t* rows = key_rows.data() + key_start[b];
    for (int64_t t0 = 0, j = 0; t0 < lens[b]; t0 += block_size, ++j) {
      const int64_t base = static_cast<int64_t>(tables[b * W + j]) * block_size * Hkv;
      const int64_t count = std::min<int64_t>(block_size, lens[b] - t0);
      for (int64_t o = 0; o < count; ++o) rows[t0 + o] = base + o * Hkv;
    }
  }
  // one task per (sequence, query head): all of the sequence's queries for that head, so
  // every key and value is read once per task, not once per query
  at::parallel_for(0, (B - first_seq) * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slots;     // [len]: each key's row in the cache (slot * Hkv + h)
    std::vector<float> scores;      // [n, len]: scores, then exponentials, by key index
    std::vector<float> visible;     // one query's visible scores, in key order
    std::vector<float> acc;         // [n, D]: weighted values
    std::vector<float> inverse;     // [n]: 1 / the exponentials' sum
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = first_seq + task / Hq, head = task % Hq, h = head / group;
      const int64_t len = lens[b], n = cu[b + 1] - cu[b], history = len - n, row0 = cu[b];
      const int64_t q_stride = Hq * D;
      const float* q0 = qd + (row0 * Hq + head) * D;
      float* o0 = od + (row0 * Hq + head) * D;
      if (len == 0) {  // a padding sequence
        for (int64_t r = 0; r < n; ++r) std::fill(o0 + r * q_stride, o0 + r * q_stride + D, 0.0f);
        continue;
      }
      const int64_t* rows = key_rows.data() + key_start[b];
      slots.resize(len);
      for (int64_t t = 0; t < len; ++t) slots[t] = rows[t] + h;
      const uint64_t* row_masks = reinterpret_cast<const uint64_t*>(masks) + (row0 - first_tree_row);
      auto sees = [&](int64_t r, int64_t t) { return t < history || ((row_masks[r] >> (t - history)) & 1); };
      const float scale_f = static_cast<float>(scale);
      scores.resize(n * len);
      int64_t key = 0;
      for (; key + 8 <= history; key += 8) {  // the history: eight keys at a time for every query
        const T* keys[8];
        for (int j = 0; j < 8; ++j) keys[j] = kd + slots[key + j] * D;
        for (int64_t r = 0; r < n; ++r) dots8(keys, q0 + r * q_stride, D, scale_f, scores.data() + r * len + key);
      }
      for (; key < history; ++key)  // its last keys: every query, four at a time
        dots(kd + slots[key] * D, q0, q_stride, n, D, scale_f, scores.data() + key, len);
      for (int64_t t = history; t < len; ++t)  // the new tokens: the queries that see them
        for (int64_t r = 0; r < n; ++r)
          if (sees(r, t)) dots(kd + slots[t] * D, q0 + r * q_stride, q_stride, 1, D, scale_f, scores.data() + r * len + t, len);
      inverse.resize(n);
      for (int64_t r = 0; r < n; ++r) {  // each query's softmax over the keys it sees, in order
        float* row = scores.data() + r * len;
        visible.assign(row, row + history);
        for (int64_t t = history; t < len; ++t)
          if (sees(r, t)) visible.push_back(row[t]);
        if (visible.empty()) {  // a query that sees nothing (an empty mask word): no attention
          inverse[r] = 0.0f;
          continue;
        }
        const float top = *std::max_element(visible.begin(), visible.end());
        inverse[r] = 1.0f / exponentials(visible.data(), static_cast<int64_t>(visible.size()), top);
        std::copy(visible.begin(), visible.begin() + history, row);
        for (int64_t t = history, i = history; t < len; ++t)
          if (sees(r, t)) row[t] = visible[i++];
      }
      // the values: keys in order; the history (seen by every query) four queries and 16
      // lanes at a time in registers, then the new tokens for the queries that see them
      acc.resize(n * D);
      for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const int64_t rs = std::min<int64_t>(4, n - r0);
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          const bool pair = d0 + 16 <= D;  // D is a multiple of 8: the last chunk may be 8 wide
          __m256 lo[4], hi[4];
          for (int64_t r = 0; r < 4; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
          for (int64_t t = 0; t < history; ++t) {
            const T* v = vd + slots[t] * D + d0;
            const __m256 v_lo = load8(v), v_hi = pair ? load8(v + 8) : v_lo;
            for (int64_t r = 0; r < rs; ++r) {
              const __m256 p = _mm256_set1_ps(scores[(r0 + r) * len + t]);
              lo[r] = _mm256_fmadd_ps(p, v_lo, lo[r]);
              hi[r] = _mm256_fmadd_ps(p, v_hi, hi[r]);
            }
          }
          for (int64_t r = 0; r < rs; ++r) {
            _mm256_storeu_ps(acc.data() + (r0 + r) * D + d0, lo[r]);
            if (pair) _mm256_storeu_ps(acc.data() + (r0 + r) * D + d0 + 8, hi[r]);
          }
        }
      }
      for (int64_t t = history; t < len; ++t) {
        const T* v = vd + slots[t] * D;
        for (int64_t r = 0; r < n; ++r)
          if (sees(r, t)) axpy(scores[r * len + t], v, acc.data() + r * D, D);
      }
      for (int64_t r = 0; r < n; ++r) {
        const __m256 inv = _mm256_set1_ps(inverse[r]);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(o0 + r * q_stride + d, _mm256_mul_ps(_mm256_loadu_ps(acc.data() + r * D + d), inv));
      }
    }
  });
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
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "out, q and the caches must be contiguous CPU tensors");
  TORCH_CHECK(out.scalar_type() == torch::kFloat && q.scalar_type() == torch::kFloat &&
              (k_cache.scalar_type() == torch::kFloat || k_cache.scalar_type() == torch::kHalf) &&
              v_cache.scalar_type() == k_cache.scalar_type(), "q and out must be fp32, the caches fp32 or fp16");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q, out [T, Hq, D] and caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && seq_lens.scalar_type() == torch::kInt &&
              cu_seqlens_q.scalar_type() == torch::kInt && tree_mask.scalar_type() == torch::kLong &&
              block_tables.is_contiguous() && seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous() &&
              tree_mask.is_contiguous(), "metadata must be contiguous int32 (tree_mask int64)");
  const int64_t Hq = q.size(1), D = q.size(2), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0 && Hq % Hkv == 0, "head sizes do not match");
  const int64_t B = seq_lens.size(0), W = block_tables.size(1);
  TORCH_CHECK(block_tables.size(0) == B && cu_seqlens_q.size(0) == B + 1 && first_seq >= 0 && first_seq <= B,
              "metadata sizes do not match");
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* masks = tree_mask.data_ptr<int64_t>();
  const float* qd = q.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t first_row = cu[first_seq];
  TORCH_CHECK(first_row >= first_tree_row && cu[B] <= q.size(0) && cu[B] - first_tree_row <= tree_mask.size(0),
              "cu_seqlens_q does not match q or tree_mask");
  for (int64_t b = first_seq; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    TORCH_CHECK(n >= 0 && n <= 64 && (lens[b] == 0 || (lens[b] >= n && (lens[b] + block_size - 1) / block_size <= W)),
                "sequence ", b, ": ", n, " queries and ", lens[b], " keys do not fit its block table");
  }
  if (k_cache.scalar_type() == torch::kHalf)
    attend(od, qd, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), cu, lens, tables, masks, B, W,
           first_seq, first_tree_row, Hq, Hkv, D, block_size, scale);
  else
    attend(od, qd, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), cu, lens, tables, masks, B, W,
           first_seq, first_tree_row, Hq, Hkv, D, block_size, scale);
}
