// What the panel kernels share (panel_linear.cpp, int8_linear.cpp): the panel layout's
// constants, the loop over a thread's panels, and argument checks.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <optional>

namespace {

constexpr int64_t PANEL = 16;   // output columns per panel: two 8-float AVX registers
constexpr int64_t QBLOCK = 32;  // k per block of codes sharing their scales (GGUF's Q4_1 and Q8_0)

// The passes over panels first .. last - 1 for all M rows, rows_per_pass rows a pass:
// multiply(p, m, rows, out, ldo) writes rows m .. m + rows - 1 times panel p into out (row
// stride ldo); the bias is added after.
template <int rows_per_pass, typename Multiply>
void panel_passes(int64_t M, int64_t N, const float* b, float* yd, int64_t first, int64_t last, Multiply multiply) {
  float tail[rows_per_pass * PANEL];  // a partial last panel's columns go through here
  for (int64_t p = first; p < last; ++p) {
    const int64_t n0 = p * PANEL, cols = std::min(PANEL, N - n0);
    for (int64_t m = 0; m < M; m += rows_per_pass) {
      const int rows = static_cast<int>(std::min<int64_t>(rows_per_pass, M - m));
      float* out = cols == PANEL ? yd + m * N + n0 : tail;
      const int64_t ldo = cols == PANEL ? N : PANEL;
      multiply(p, m, rows, out, ldo);
      if (cols == PANEL && b == nullptr) continue;  // already in place
      for (int r = 0; r < rows; ++r) {
        float* row = yd + (m + r) * N + n0;
        for (int64_t c = 0; c < cols; ++c) {
          const float sum = cols == PANEL ? row[c] : tail[r * PANEL + c];
          row[c] = b ? sum + b[n0 + c] : sum;
        }
      }
    }
  }
}

inline const float* checked_bias(const std::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == torch::kFloat &&
              bias->is_contiguous(), "bias must be a contiguous fp32 [N] tensor");
  return bias->data_ptr<float>();
}

inline void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D fp32 CPU tensor");
}

}  // namespace
