// Linear layers in 8-bit integer arithmetic for x86-64 CPUs with AVX-512 VNNI: y = x W^T + b
// with W a model's 4-bit (GGUF Q4_1) or 8-bit (Q8_0) weights and x rounded to 8 bits.
//
// The exact panels (panel_linear.cpp) multiply in fp32: past a few rows a pass is bound by
// its multiply-adds (16 a cycle and core), so every token a speculative tree adds costs its
// full share of compute. Here each row of x is rounded, per block of 32 k, to 8-bit codes
// times a step (d_x = max |x| / 127; llama.cpp's Q8_0 / Q8_1 for activations), and a
// block's products are integer dot products: one VPDPBUSD multiplies 64 code pairs and sums
// them by 4 into 16 int32 lanes, one lane per output column of the panel. A block then adds
// d_w d_x dot (+ m_w d_x sum(codes_x) for Q4_1's minimum) to the row's fp32 sum. That is
// about 4x less compute a row than fp32 multiply-adds; a lone row is still bound by the
// weights' trip from memory.
//
// This changes the numbers: x is rounded (a relative error of up to 1/254 of the block's
// largest value per element), so outputs are close to the exact fp32 product, not equal,
// and greedy text may part from the fp32 path's after a while. What speculation needs still
// holds: a row's codes and steps depend only on that row, integer sums are exact in any
// order, and the blocks add up in k order, so a row's result never depends on the rows
// beside it, and a token verified in a tree gets the bits it gets when decoded alone.
//
// Layouts (models/packed_linear.py writes them; panels of 16 output columns as everywhere):
// - Q4: codes [P, K / 32, 4, 64] uint8. In group pair h of a block, byte 4j + i holds column
//   j's code for k = 8h + i in its low nibble and for k = 8h + 4 + i in its high one; scales
//   [P, K / 32, 2, 16] fp16 (each column's d, then its m: GGUF's own fp16 values).
// - Q8: codes [P, K / 32, 8, 64] int8, byte 4j + i of group g: column j, k = 4g + i; scales
//   [P, K / 32, 16] fp16 (d); sums [P, K / 32, 16] int16 (each column's codes summed over
//   the block). VPDPBUSD multiplies unsigned by signed bytes, so x's codes go in as x + 128
//   (flipping the sign bit) and 128 times the weights' sum comes off again.
// A lone row is bound by the trip from memory: 0.625 bytes a weight for Q4 (fp32 scales
// would make it 0.75), 1.06 for Q8. With 2+ rows a pass is bound by its dots and the memory
// bus would idle, so each block's pass over a panel also prefetches the same block of the
// next panel into L2 (panels lie one after another): the decoder's 120 Q4 matrices at 4
// rows took 2.5 ms against 2.9 without it, at 8 rows 4.1 against 4.4; prefetching for a lone
// row gained nothing (docs/benchmarks.md, nineteenth session). A prefetch past the last
// panel reads nothing it must not: prefetches never fault.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "panels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

namespace {

constexpr int INT8_ROWS = 8;  // rows per pass over a panel: 8 int32 dots + 8 fp32 sums

// x [M, K] rounded per block of 32: codes [M, K] int8, steps d [M, K / 32], and d * sum(codes).
struct Int8Rows {
  const int8_t* codes;
  const float* steps;
  const float* sums;
  int64_t K;
};

static_assert(QBLOCK == 32, "quantize_rows takes a block as two 16-float registers");

Int8Rows quantize_rows(const torch::Tensor& x, torch::Tensor& codes, torch::Tensor& scales) {
  const int64_t M = x.size(0), K = x.size(1), blocks = K / QBLOCK;
  codes = torch::empty({M, K}, x.options().dtype(torch::kChar));
  scales = torch::empty({2, M, blocks}, x.options());
  const float* xd = x.data_ptr<float>();
  int8_t* cd = codes.data_ptr<int8_t>();
  float* steps = scales.data_ptr<float>();
  float* sums = steps + M * blocks;
  // a few thousand blocks a thread: a decode step's rows are not worth a parallel region (~10 us)
  at::parallel_for(0, M * blocks, 4096, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const float* v = xd + i * QBLOCK;  // block i % blocks of row i / blocks
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      // the largest |x|, the step and the codes: round(x / d) to nearest even (the default
      // rounding mode, as std::nearbyint), within +-127 by construction (for finite x: a NaN
      // gives garbage codes, as it did in the scalar loop this replaced)
      const float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = largest / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inverse)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inverse)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cd + i * QBLOCK), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cd + i * QBLOCK + 16), _mm512_cvtepi32_epi8(q1));
      steps[i] = d;
      sums[i] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  });
  return {cd, steps, sums, K};
}

// One block's integer dot products of rows_ rows with a panel's 16 columns, then their
// scaled sum into each row's fp32 accumulator.
// 16 fp16 values -> 16 floats
inline __m512 halves(const at::Half* h) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
}

struct Q4Int8 {
  static constexpr int64_t code_bytes = 256, scale_halves = 2 * PANEL;
  const uint8_t* codes;  // the panel's
  const at::Half* scales;
  int64_t blocks;        // blocks of 32 k per panel
  inline void prefetch(int64_t b) const {  // the next panel's block b
    const char* c = reinterpret_cast<const char*>(codes + (blocks + b) * code_bytes);
    for (int line = 0; line < 4; ++line) _mm_prefetch(c + 64 * line, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(scales + (blocks + b) * scale_halves), _MM_HINT_T1);
  }
  template <int rows_>
  inline void dots(int64_t b, const int32_t* const* x, __m512i* dot) const {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 4; ++h) {
      const __m512i packed = _mm512_loadu_si512(codes + b * code_bytes + 64 * h);
      const __m512i low = _mm512_and_si512(packed, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      for (int r = 0; r < rows_; ++r) {
        dot[r] = _mm512_dpbusd_epi32(dot[r], low, _mm512_set1_epi32(x[r][2 * h]));
        dot[r] = _mm512_dpbusd_epi32(dot[r], high, _mm512_set1_epi32(x[r][2 * h + 1]));
      }
    }
  }
  inline __m512 add(int64_t b, __m512i dot, float step, float sum, __m512 acc) const {
    const at::Half* s = scales + b * scale_halves;
    acc = _mm512_fmadd_ps(_mm512_mul_ps(halves(s), _mm512_set1_ps(step)), _mm512_cvtepi32_ps(dot), acc);
    return _mm512_fmadd_ps(halves(s + PANEL), _mm512_set1_ps(sum), acc);
  }
};

struct Q8Int8 {
  static constexpr int64_t code_bytes = 512, scale_halves = PANEL;
  const int8_t* codes;  // the panel's
  const at::Half* scales;
  const int16_t* sums;
  int64_t blocks;
  inline void prefetch(int64_t b) const {
    const char* c = reinterpret_cast<const char*>(codes + (blocks + b) * code_bytes);
    for (int line = 0; line < 8; ++line) _mm_prefetch(c + 64 * line, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(scales + (blocks + b) * scale_halves), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(sums + (blocks + b) * PANEL), _MM_HINT_T1);
  }
  template <int rows_>
  inline void dots(int64_t b, const int32_t* const* x, __m512i* dot) const {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int g = 0; g < 8; ++g) {
      const __m512i w = _mm512_loadu_si512(codes + b * code_bytes + 64 * g);
      for (int r = 0; r < rows_; ++r)
        dot[r] = _mm512_dpbusd_epi32(dot[r], _mm512_xor_si512(_mm512_set1_epi32(x[r][g]), flip), w);
    }
  }
  inline __m512 add(int64_t b, __m512i dot, float step, float, __m512 acc) const {
    const __m512i sum = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + b * PANEL)));
    const __m512i exact = _mm512_sub_epi32(dot, _mm512_slli_epi32(sum, 7));
    return _mm512_fmadd_ps(_mm512_mul_ps(halves(scales + b * scale_halves), _mm512_set1_ps(step)),
                           _mm512_cvtepi32_ps(exact), acc);
  }
};

template <int rows_, typename Panel>
inline void int8_product(const Int8Rows& x, int64_t m, const Panel& panel, float* out, int64_t ldo) {
  const int64_t blocks = x.K / QBLOCK;
  __m512 acc[rows_];
  for (int r = 0; r < rows_; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t* rows[rows_];
    __m512i dot[rows_];
    for (int r = 0; r < rows_; ++r) {
      rows[r] = reinterpret_cast<const int32_t*>(x.codes + (m + r) * x.K + b * QBLOCK);
      dot[r] = _mm512_setzero_si512();
    }
    if (rows_ > 1) panel.prefetch(b);
    panel.template dots<rows_>(b, rows, dot);
    for (int r = 0; r < rows_; ++r) {
      const int64_t i = (m + r) * blocks + b;
      acc[r] = panel.add(b, dot[r], x.steps[i], x.sums[i], acc[r]);
    }
  }
  for (int r = 0; r < rows_; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

template <typename Panel>
void int8_rows_times_panel(int rows, const Int8Rows& x, int64_t m, const Panel& panel, float* out, int64_t ldo) {
  switch (rows) {
    case 1: return int8_product<1>(x, m, panel, out, ldo);
    case 2: return int8_product<2>(x, m, panel, out, ldo);
    case 3: return int8_product<3>(x, m, panel, out, ldo);
    case 4: return int8_product<4>(x, m, panel, out, ldo);
    case 5: return int8_product<5>(x, m, panel, out, ldo);
    case 6: return int8_product<6>(x, m, panel, out, ldo);
    case 7: return int8_product<7>(x, m, panel, out, ldo);
    default: return int8_product<INT8_ROWS>(x, m, panel, out, ldo);
  }
}

void check_int8_weights(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                        int64_t code_bytes, int64_t scale_halves, int64_t N) {
  check_x(x);
  const int64_t K = x.size(1), P = codes.size(0);
  TORCH_CHECK(K % QBLOCK == 0, "K = ", K, " is not a multiple of ", QBLOCK);
  TORCH_CHECK(codes.element_size() == 1 && codes.is_contiguous() && codes.numel() == P * K / QBLOCK * code_bytes,
              "codes must be a contiguous 8-bit tensor of ", code_bytes, " bytes per panel and block of 32 k");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() &&
              scales.numel() == P * K / QBLOCK * scale_halves,
              "scales must be a contiguous fp16 tensor of ", scale_halves, " per panel and block of 32 k");
  TORCH_CHECK(N > (P - 1) * PANEL && N <= P * PANEL, "N = ", N, " does not match ", P, " panels");
}

template <typename Make>
torch::Tensor int8_linear(const torch::Tensor& x, int64_t P, const std::optional<torch::Tensor>& bias, int64_t N,
                          Make make_panel) {
  const float* b = checked_bias(bias, N);
  torch::Tensor codes, scales;
  const Int8Rows rows = quantize_rows(x, codes, scales);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    panel_passes<INT8_ROWS>(M, N, b, y.data_ptr<float>(), first, last,
                            [&](int64_t p, int64_t m, int count, float* out, int64_t ldo) {
      int8_rows_times_panel(count, rows, m, make_panel(p), out, ldo);
    });
  });
  return y;
}

}  // namespace

bool int8_linear_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// x [M, K] fp32 times Q4_1 weights in the layout above -> y [M, N] fp32.
torch::Tensor q4_int8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                             const std::optional<torch::Tensor>& bias, int64_t N) {
  TORCH_CHECK(int8_linear_supported(), "q4_int8_linear needs AVX-512 with VNNI");
  check_int8_weights(x, codes, scales, Q4Int8::code_bytes, Q4Int8::scale_halves, N);
  const int64_t per_panel = x.size(1) / QBLOCK;
  const uint8_t* cd = static_cast<const uint8_t*>(codes.data_ptr());
  const at::Half* sd = scales.data_ptr<at::Half>();
  return int8_linear(x, codes.size(0), bias, N, [&](int64_t p) {
    return Q4Int8{cd + p * per_panel * Q4Int8::code_bytes, sd + p * per_panel * Q4Int8::scale_halves, per_panel};
  });
}

// x [M, K] fp32 times Q8_0 weights in the layout above -> y [M, N] fp32.
torch::Tensor q8_int8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                             const torch::Tensor& sums, const std::optional<torch::Tensor>& bias, int64_t N) {
  TORCH_CHECK(int8_linear_supported(), "q8_int8_linear needs AVX-512 with VNNI");
  check_int8_weights(x, codes, scales, Q8Int8::code_bytes, Q8Int8::scale_halves, N);
  TORCH_CHECK(sums.scalar_type() == torch::kShort && sums.is_contiguous() && sums.numel() == scales.numel(),
              "sums must be a contiguous int16 tensor shaped like scales");
  const int64_t per_panel = x.size(1) / QBLOCK;
  const int8_t* cd = static_cast<const int8_t*>(codes.data_ptr());
  const at::Half* sd = scales.data_ptr<at::Half>();
  const int16_t* wd = sums.data_ptr<int16_t>();
  return int8_linear(x, codes.size(0), bias, N, [&](int64_t p) {
    return Q8Int8{cd + p * per_panel * Q8Int8::code_bytes, sd + p * per_panel * Q8Int8::scale_halves,
                  wd + p * per_panel * PANEL, per_panel};
  });
}

#pragma GCC pop_options
