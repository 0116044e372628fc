// Small AVX2 helpers the CPU kernels share.
#pragma once

#include <immintrin.h>

namespace {

// The eight lanes' sum, in a fixed order (so a sum has the same bits wherever it is taken).
inline float hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

}  // namespace
