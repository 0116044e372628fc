// The small per-layer operations of a decode step, fp32 on x86-64 with AVX2: RMSNorm and the
// rotary embedding of queries and keys.
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

#include "simd.h"

namespace {

constexpr int64_t ROWS_PER_TASK = 16;

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous fp32 CPU tensor");
}

}  // namespace

// x [T, H] -> weight * (x / sqrt(mean(x^2) + eps)), row by row. The squares are summed in
// eight lanes (h mod 8) and the lanes in a fixed order.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1) && x.size(1) % 8 == 0,
              "x must be [T, H] with H a multiple of 8 and weight [H]");
  const int64_t T = x.size(0), H = x.size(1);
  auto out = torch::empty_like(x);
  const float* xd = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, T, ROWS_PER_TASK, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const float* row = xd + t * H;
      __m256 sum8 = _mm256_setzero_ps();
      for (int64_t h = 0; h < H; h += 8) {
        const __m256 v = _mm256_loadu_ps(row + h);
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
