// Activation-sparse GEMV, AVX2 + FMA: as sparse_x_avx512.cpp with 8-float vectors and chunks of 128
// output columns (16 accumulators in registers).
#include <immintrin.h>

#include "kernels.h"

namespace pk {

void gemv_sparse_x_avx2(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = 128;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < n1 ? c0 + kChunk : n1;
    const int64_t full = (c1 - c0) / 8, rest = (c1 - c0) % 8;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(rest)), lane);
    __m256 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t a = 0; a < count; ++a) {
      const float* row = wt + int64_t(idx[a]) * N + c0;
      if (a + 1 < count) {
        const char* nxt = reinterpret_cast<const char*>(wt + int64_t(idx[a + 1]) * N + c0);
        for (int64_t b = 0; b < (c1 - c0) * 4; b += 64) _mm_prefetch(nxt + b, _MM_HINT_T0);
      }
      const __m256 xv = _mm256_set1_ps(vals[a]);
      for (int64_t j = 0; j < full; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(row + 8 * j), acc[j]);
      if (rest) acc[full] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(row + 8 * full, tail), acc[full]);
    }
    for (int64_t j = 0; j < full; ++j) _mm256_storeu_ps(y + c0 + 8 * j, acc[j]);
    if (rest) _mm256_maskstore_ps(y + c0 + 8 * full, tail, acc[full]);
  }
}

}  // namespace pk
