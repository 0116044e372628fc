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
// Quantized panels (Q4, Q8 below): where a matrix's weights are exactly the values GGUF's
// Q4_1 or Q8_0 dequantization gives (the default model's are: it comes from such a GGUF),
// the panels hold the codes and per-block scales, 6 or 9 bits a weight, and each pass
// dequantizes them in registers with GGUF's own roundings: the very fp32 weights, the same
// products and sums, the same bits as the fp32 panels. Their passes are compute-bound, so
// they pay for a few rows (1-6 rows: 1.7-3x the fp32 panels on the development VM) and not
// for many (32+: ~0.75x); models/packed_linear.py picks per call (docs/benchmarks.md).
//
// Every output element is one sum over k in order, started from zero, with the bias added
// last, whatever the number of rows: a row's result never depends on the rows beside it, so
// a speculative tree and a plain step compute bit-identical logits for the same token.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "panels.h"

namespace {

constexpr int ROWS = 6;  // input rows per pass over a panel: 12 accumulators + 2 weights

// A panel's weights at row k, two AVX registers (columns 0-7, 8-15): fp32 panels read them;
// quantized ones dequantize them.
struct Fp32 {
  const float* panel;
  const float* next;  // a panel to prefetch meanwhile (one line per k, into L2), or null
  inline void weights(int64_t k, __m256& lo, __m256& hi) const {
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * PANEL), _MM_HINT_T1);
    lo = _mm256_loadu_ps(panel + k * PANEL);
    hi = _mm256_loadu_ps(panel + k * PANEL + 8);
  }
};

// GGUF's Q4_1: per block and column a step d and a minimum m; codes [P, K, 8] uint8 (byte j
// of row k: column j in the low nibble, column j + 8 in the high one), scales [P, K / 32, 2,
// 16] (the block's d of each column, then its m). Weight = d * code + m, rounded after the
// product and after the sum, as GGUF's dequantization computes it.
struct Q4 {
  static constexpr int64_t code_bytes = PANEL / 2, scale_floats = 2 * PANEL;
  const uint8_t* codes;  // the panel's
  const float* scales;
  inline void weights(int64_t k, __m256& lo, __m256& hi) const {
    const float* s = scales + k / QBLOCK * scale_floats;
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k * code_bytes)));
    const __m256 c_lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F)));
    const __m256 c_hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
    lo = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s), c_lo), _mm256_loadu_ps(s + PANEL));
    hi = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s + 8), c_hi), _mm256_loadu_ps(s + PANEL + 8));
  }
};

// GGUF's Q8_0: per block and column a step d; codes [P, K, 16] int8, scales [P, K / 32, 16].
// Weight = d * code, one rounding.
struct Q8 {
  static constexpr int64_t code_bytes = PANEL, scale_floats = PANEL;
  const uint8_t* codes;  // the panel's
  const float* scales;
  inline void weights(int64_t k, __m256& lo, __m256& hi) const {
    const float* s = scales + k / QBLOCK * scale_floats;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * code_bytes));
    lo = _mm256_mul_ps(_mm256_loadu_ps(s), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
    hi = _mm256_mul_ps(_mm256_loadu_ps(s + 8), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))));
  }
};

// rows_ input rows [rows_, K] (row stride ldx) times one panel [K, 16] -> out [rows_, 16]:
// each k's 16 weights (read, or dequantized in registers: every pass dequantizes again; a
// dequantized copy in L2 read by fp32 passes measured slower), times every row, summed in
// k order.
template <int rows_, typename Panel>
inline void panel_product(const float* x, int64_t ldx, const Panel& panel, int64_t K, float* out, int64_t ldo) {
  __m256 lo[rows_], hi[rows_];
  for (int r = 0; r < rows_; ++r) {
    lo[r] = _mm256_setzero_ps();
    hi[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 w_lo, w_hi;
    panel.weights(k, w_lo, w_hi);
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

template <typename Panel>
void rows_times_panel(int rows, const float* x, int64_t K, const Panel& panel, float* out, int64_t ldo) {
  switch (rows) {
    case 1: return panel_product<1>(x, K, panel, K, out, ldo);
    case 2: return panel_product<2>(x, K, panel, K, out, ldo);
    case 3: return panel_product<3>(x, K, panel, K, out, ldo);
    case 4: return panel_product<4>(x, K, panel, K, out, ldo);
    case 5: return panel_product<5>(x, K, panel, K, out, ldo);
    default: return panel_product<ROWS>(x, K, panel, K, out, ldo);
  }
}

}  // namespace

// x [M, K] fp32 contiguous, panels [P, K, 16] fp32 contiguous, bias [N] or None -> y [M, N].
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels,
                           const std::optional<torch::Tensor>& bias, int64_t N) {
  check_x(x);
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == PANEL && panels.scalar_type() == torch::kFloat &&
              panels.is_contiguous(), "panels must be a contiguous fp32 [P, K, 16] tensor");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "x has ", K, " columns but the panels were packed for ", panels.size(1));
  TORCH_CHECK(N > (P - 1) * PANEL && N <= P * PANEL, "N = ", N, " does not match ", P, " panels");
  const float* b = checked_bias(bias, N);
  auto y = torch::empty({M, N}, x.options());
  const float* xd = x.data_ptr<float>();
  const float* wd = panels.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    panel_passes<ROWS>(M, N, b, y.data_ptr<float>(), first, last, [&](int64_t p, int64_t m, int rows, float* out, int64_t ldo) {
      const float* panel = wd + p * K * PANEL;
      const float* next = m == 0 && M > 1 && p + 1 < last ? panel + K * PANEL : nullptr;
      rows_times_panel(rows, xd + m * K, K, Fp32{panel, next}, out, ldo);
    });
  });
  return y;
}

namespace {

// The same product over quantized panels (Q4 or Q8 above): a panel dequantized here holds the
// very fp32 weights the fp32 panels hold when the weights are such values, so y has the same
// bits, while the weights' trip from memory is 6 (Q4) or 9 (Q8) bits each, not 32.
template <typename Format>
torch::Tensor quantized_panel_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                                     const std::optional<torch::Tensor>& bias, int64_t N) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  TORCH_CHECK(codes.dim() == 3 && codes.size(1) == K && codes.size(2) == Format::code_bytes &&
              codes.element_size() == 1 && codes.is_contiguous(),
              "codes must be a contiguous 8-bit [P, K, ", Format::code_bytes, "] tensor for x's K = ", K);
  TORCH_CHECK(K % QBLOCK == 0 && scales.size(0) == P && scales.numel() == P * K / QBLOCK * Format::scale_floats &&
              scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
              "scales must be a contiguous fp32 tensor of ", Format::scale_floats, " per panel and block of 32 k");
  TORCH_CHECK(N > (P - 1) * PANEL && N <= P * PANEL, "N = ", N, " does not match ", P, " panels");
  const float* b = checked_bias(bias, N);
  auto y = torch::empty({M, N}, x.options());
  const float* xd = x.data_ptr<float>();
  const uint8_t* cd = static_cast<const uint8_t*>(codes.data_ptr());
  const float* sd = scales.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    panel_passes<ROWS>(M, N, b, y.data_ptr<float>(), first, last, [&](int64_t p, int64_t m, int rows, float* out, int64_t ldo) {
      const Format panel{cd + p * K * Format::code_bytes, sd + p * K / QBLOCK * Format::scale_floats};
      rows_times_panel(rows, xd + m * K, K, panel, out, ldo);
    });
  });
  return y;
}

}  // namespace

torch::Tensor q4_panel_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const std::optional<torch::Tensor>& bias, int64_t N) {
  return quantized_panel_linear<Q4>(x, codes, scales, bias, N);
}

torch::Tensor q8_panel_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const std::optional<torch::Tensor>& bias, int64_t N) {
  return quantized_panel_linear<Q8>(x, codes, scales, bias, N);
}
