// Small-batch fp32 linear layers for x86-64 CPUs with AVX2 and FMA: y = x W^T + b.
//
// A decode or tree-verification step multiplies a few rows by every weight matrix of the
// model, so its time is the weights' trip from memory; a general GEMM library spends more
// than that on so few rows (oneDNN: 1.4x the memory-bound time for 1 row, 2x for 4-8, on a
// 2-core AVX2 machine; docs/benchmarks.md). Here the weights are stored once as panels of
// 16 output columns, [P][K][16] with P = ceil(N / 16) (panel p holds columns 16p..16p+15,
// k-major, zero-padded), so each panel streams contiguously from memory and up to ROWS input
// rows share every load of it (2 AVX registers of weights, 2 * ROWS accumulators); further
// rows re-read the panel from cache. Threads take whole panels (ATen's intra-op pool).
//
// With several rows a panel's pass is compute-bound, not memory-bound: while it runs the
// memory bus would idle, and the next panel would stall the pass after it. So the first
// pass over a panel prefetches the next one (one line per k, into L2): with it, 2 to 12
// rows cost about what 1 row costs (30 layers of SmolLM2-135M on a 2-core AVX2 VM: 8 rows
// 22 ms against 29 without it, 1 row 18 ms; docs/benchmarks.md). A lone row leaves it to
// the hardware prefetcher, which keeps up with its stream (prefetching there cost ~5%).
//
// Every output element is one sum over k in order, started from zero, with the bias added
// last, whatever the number of rows: a row's result never depends on the rows beside it, so
// a speculative tree and a plain step compute bit-identical logits for the same token.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t PANEL = 16;  // output columns per panel: two 8-float AVX registers
constexpr int ROWS = 6;        // input rows per pass over a panel: 12 accumulators + 2 weights

// rows_ input rows [rows_, K] (row stride ldx) times one panel [K, 16] -> out [rows_, 16];
// next: a panel to prefetch meanwhile, or null.
template <int rows_>
inline void panel_product(const float* x, int64_t ldx, const float* panel, int64_t K,
                          float* out, int64_t ldo, const float* next) {
  __m256 lo[rows_], hi[rows_];
  for (int r = 0; r < rows_; ++r) {
    lo[r] = _mm256_setzero_ps();
    hi[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * PANEL), _MM_HINT_T1);
    const __m256 w_lo = _mm256_loadu_ps(panel + k * PANEL);
    const __m256 w_hi = _mm256_loadu_ps(panel + k * PANEL + 8);
    for (int r = 0; r < rows_; ++r) {
      const __m256 xk = _mm256_broadcast_ss(x + r * ldx + k);
      lo[r] = _mm256_fmadd_ps(xk, w_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(xk, w_hi, hi[r]);
    }
  }
  for (int r = 0; r < rows_; ++r) {
    _mm256_storeu_ps(out + r * ldo, lo[r]);
    _mm256_storeu_ps(out + r * ldo + 8, hi[r]);
  }
}

void rows_times_panel(int rows, const float* x, int64_t K, const float* panel, float* out, int64_t ldo,
                      const float* next) {
  switch (rows) {
    case 1: panel_product<1>(x, K, panel, K, out, ldo, next); break;
    case 2: panel_product<2>(x, K, panel, K, out, ldo, next); break;
    case 3: panel_product<3>(x, K, panel, K, out, ldo, next); break;
    case 4: panel_product<4>(x, K, panel, K, out, ldo, next); break;
    case 5: panel_product<5>(x, K, panel, K, out, ldo, next); break;
    default: panel_product<ROWS>(x, K, panel, K, out, ldo, next); break;
  }
}

}  // namespace

// x [M, K] fp32 contiguous, panels [P, K, 16] fp32 contiguous, bias [N] or None -> y [M, N].
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels,
                           const std::optional<torch::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D fp32 CPU tensor");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == PANEL && panels.scalar_type() == torch::kFloat &&
              panels.is_contiguous(), "panels must be a contiguous fp32 [P, K, 16] tensor");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "x has ", K, " columns but the panels were packed for ", panels.size(1));
  TORCH_CHECK(N > (P - 1) * PANEL && N <= P * PANEL, "N = ", N, " does not match ", P, " panels");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == torch::kFloat &&
                bias->is_contiguous(), "bias must be a contiguous fp32 [N] tensor");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* wd = panels.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    float tail[ROWS * PANEL];  // a partial last panel's columns go through here
    for (int64_t p = first; p < last; ++p) {
      const float* panel = wd + p * K * PANEL;
      const int64_t n0 = p * PANEL, cols = std::min(PANEL, N - n0);
      for (int64_t m = 0; m < M; m += ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, M - m));
        float* out = cols == PANEL ? yd + m * N + n0 : tail;
        const int64_t ldo = cols == PANEL ? N : PANEL;
        const float* next = m == 0 && M > 1 && p + 1 < last ? panel + K * PANEL : nullptr;
        rows_times_panel(rows, xd + m * K, K, panel, out, ldo, next);
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
  });
  return y;
}
