// The small per-layer operations of a decode step, fp32 on x86-64 with AVX2: RMSNorm (alone,
// or after adding a layer's output to the residual stream), the rotary embedding of queries
// and keys, SwiGLU's silu(gate) * up, and the writes of new keys and values to the cache.
//
// At batch 1 each is a few microseconds of arithmetic, but through PyTorch's CPU operators
// an RMSNorm costs ~20 us (it runs as several operators) and the rotary embedding ~22 us; a
// SmolLM2-135M step makes 61 norms and 30 rotations, ~2 ms of an ~11 ms step (with the
// 8-bit integer linear layers; docs/benchmarks.md). Here each is one call. Every row is
// computed on its own, in a fixed order, so a row's bits never depend on the rows beside it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <optional>

#include "simd.h"

namespace {

constexpr int64_t ROWS_PER_TASK = 16;

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous fp32 CPU tensor");
}

}  // namespace

// x [T, H] -> weight * (x / sqrt(mean(x^2) + eps)), row by row; with `add` [T, H], x += add
// first (in place: the residual stream) and the sum normalized. The squares are summed in
// eight lanes (h mod 8) and the lanes in a fixed order.
torch::Tensor rms_norm(torch::Tensor& x, const torch::Tensor& weight, double eps,
                       const std::optional<torch::Tensor>& add) {
  check_rows(x, "x");
  check_rows(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1) && x.size(1) % 8 == 0,
              "x must be [T, H] with H a multiple of 8 and weight [H]");
  if (add) {
    check_rows(*add, "add");
    TORCH_CHECK(add->sizes() == x.sizes(), "add must be shaped like x");
  }
  const int64_t T = x.size(0), H = x.size(1);
  auto out = torch::empty_like(x);
  float* xd = x.data_ptr<float>();
  const float* ad = add ? add->data_ptr<float>() : nullptr;
  const float* w = weight.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, T, ROWS_PER_TASK, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      float* row = xd + t * H;
      __m256 sum8 = _mm256_setzero_ps();
      for (int64_t h = 0; h < H; h += 8) {
        __m256 v = _mm256_loadu_ps(row + h);
        if (ad) {
          v = _mm256_add_ps(v, _mm256_loadu_ps(ad + t * H + h));
          _mm256_storeu_ps(row + h, v);
        }
        sum8 = _mm256_add_ps(sum8, _mm256_mul_ps(v, v));
      }
      const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(hsum(sum8) / static_cast<float>(H) + static_cast<float>(eps)));
      for (int64_t h = 0; h < H; h += 8)
        _mm256_storeu_ps(od + t * H + h, _mm256_mul_ps(_mm256_loadu_ps(w + h),
                                                       _mm256_mul_ps(_mm256_loadu_ps(row + h), scale)));
    }
  });
  return out;
}

// In place on the first `heads` heads of x [T, heads_total, D]: rotate-half rotary embedding
// with cos, sin [T, D] (each half repeated, as models/llama.py builds them):
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each a product then a sum as PyTorch's
// x * cos + rotate_half(x) * sin computes it.
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads) {
  check_rows(x, "x");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && heads >= 0 && heads <= x.size(1),
              "x must be [T, heads, D] with at least ", heads, " heads");
  const int64_t T = x.size(0), stride = x.size(1) * x.size(2), D = x.size(2), half = D / 2;
  TORCH_CHECK(half % 8 == 0 && cos.numel() == T * D && sin.numel() == T * D, "cos and sin must be [T, D], D % 16 == 0");
  float* xd = x.data_ptr<float>();
  const float* cd = cos.data_ptr<float>();
  const float* sd = sin.data_ptr<float>();
  at::parallel_for(0, T, ROWS_PER_TASK, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const float* c = cd + t * D;
      const float* s = sd + t * D;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xd + t * stride + h * D;
        for (int64_t i = 0; i < half; i += 8) {
          const __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + half + i);
          const __m256 minus_x2 = _mm256_xor_ps(x2, _mm256_set1_ps(-0.0f));
          const __m256 y1 = _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)),
                                          _mm256_mul_ps(minus_x2, _mm256_loadu_ps(s + i)));
          const __m256 y2 = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                          _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i)));
          _mm256_storeu_ps(v + i, y1);
          _mm256_storeu_ps(v + half + i, y2);
        }
      }
    }
  });
}

// gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I], silu(g) = g * sigmoid(g) with
// sigmoid from e^-|g| (exp8's domain): 1 / (1 + e) for g >= 0, e / (1 + e) below.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 16 == 0, "gate_up must be [T, 2I] with I a multiple of 8");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gd = gate_up.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, T, ROWS_PER_TASK, [&](int64_t first, int64_t last) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t t = first; t < last; ++t) {
      const float* gate = gd + t * 2 * I;
      for (int64_t i = 0; i < I; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_or_ps(g, sign));                     // e^-|g|
        const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, g), _mm256_add_ps(one, e));  // by g's sign
        _mm256_storeu_ps(od + t * I + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(gate + I + i)));
      }
    }
  });
  return out;
}

// k, v [T, Hkv, D] (heads and head dim contiguous, rows of any stride) into the caches
// [blocks, block_size, Hkv, D] (fp32, or fp16 rounded to nearest) at slots [T] (int64; -1: a
// padding row, skipped).
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slots) {
  TORCH_CHECK(k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat && k.dim() == 3 &&
              v.sizes() == k.sizes() && k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 &&
              v.stride(1) == v.size(2), "k and v must be fp32 [T, Hkv, D], each row's heads contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
              v_cache.sizes() == k_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type() &&
              (k_cache.scalar_type() == torch::kFloat || k_cache.scalar_type() == torch::kHalf) &&
              k_cache.size(2) * k_cache.size(3) == k.size(1) * k.size(2),
              "the caches must be contiguous fp32 or fp16 [blocks, block_size, Hkv, D] matching k");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == k.size(0),
              "slots must be int64 [T]");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), capacity = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(row % 8 == 0, "a row of keys must be a multiple of 8 floats");
  const int64_t* sd = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sd[t] >= -1 && sd[t] < capacity, "slot ", sd[t], " out of range");
  const bool half = k_cache.scalar_type() == torch::kHalf;
  for (int which = 0; which < 2; ++which) {
    const torch::Tensor& src = which ? v : k;
    torch::Tensor& dst = which ? v_cache : k_cache;
    const float* in = src.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      if (sd[t] < 0) continue;
      const float* from = in + t * src.stride(0);
      if (half) {
        auto* to = reinterpret_cast<__m128i*>(dst.data_ptr<at::Half>() + sd[t] * row);
        for (int64_t i = 0; i < row; i += 8)
          _mm_storeu_si128(to + i / 8, _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT));
      } else {
        std::copy(from, from + row, dst.data_ptr<float>() + sd[t] * row);
      }
    }
  }
}

// logits [T, V] fp32 -> each row's argmax [T] int64, as torch.argmax gives it: the first
// index of the largest value, or of the first NaN where a row has one. PyTorch's CPU argmax
// is scalar (~90 us a row of SmolLM2's 49,152 logits on the development VM); this is two
// vector passes (the max, then its first index).
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be [T, V] with V > 0");
  const int64_t T = logits.size(0), V = logits.size(1);
  auto out = torch::empty({T}, logits.options().dtype(torch::kLong));
  const float* ld = logits.data_ptr<float>();
  int64_t* od = out.data_ptr<int64_t>();
  at::parallel_for(0, T, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const float* row = ld + t * V;
      __m256 top8 = _mm256_set1_ps(-INFINITY);
      __m256 nan8 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= V; i += 8) {
        const __m256 x = _mm256_loadu_ps(row + i);
        top8 = _mm256_max_ps(top8, x);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, top8);
      float top = lanes[0];
      for (int j = 1; j < 8; ++j) top = std::max(top, lanes[j]);
      bool nan = _mm256_movemask_ps(nan8) != 0;
      for (int64_t j = i; j < V; ++j) {
        nan = nan || std::isnan(row[j]);
        top = std::max(top, row[j]);
      }
      int64_t index = 0;
      if (nan) {  // NaN counts as the largest: the first one
        while (!std::isnan(row[index])) ++index;
      } else {
        const __m256 want = _mm256_set1_ps(top);
        int64_t j = 0;
        for (; j + 8 <= V; j += 8) {
          const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), want, _CMP_EQ_OQ));
          if (hits) break;
        }
        while (row[j] != top) ++j;
        index = j;
      }
      od[t] = index;
    }
  });
  return out;
}
