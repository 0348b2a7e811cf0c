// Activation-sparse GEMV, AVX-512F: y[N] = Σ_{k active} x_k · Wᵀ[k, :] with the weight stored
// input-major (Wᵀ, K rows of N), so each active input reads one contiguous row and an inactive one
// is never read. Output columns are split in chunks of 256 (16 accumulators held in registers
// across all active inputs); the next active row's chunk is prefetched while this one is added.
#include <immintrin.h>

#include "kernels.h"

namespace pk {

void gemv_sparse_x_avx512(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = 256;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < n1 ? c0 + kChunk : n1;
    const int64_t full = (c1 - c0) / 16;
    const __mmask16 tail = __mmask16((1u << ((c1 - c0) % 16)) - 1u);
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t a = 0; a < count; ++a) {
      const float* row = wt + int64_t(idx[a]) * N + c0;
      if (a + 1 < count) {
        const char* nxt = reinterpret_cast<const char*>(wt + int64_t(idx[a + 1]) * N + c0);
        for (int64_t b = 0; b < (c1 - c0) * 4; b += 64) _mm_prefetch(nxt + b, _MM_HINT_T0);
      }
      const __m512 xv = _mm512_set1_ps(vals[a]);
      for (int64_t j = 0; j < full; ++j) acc[j] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(row + 16 * j), acc[j]);
      if (tail) acc[full] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, row + 16 * full), acc[full]);
    }
    for (int64_t j = 0; j < full; ++j) _mm512_storeu_ps(y + c0 + 16 * j, acc[j]);
    if (tail) _mm512_mask_storeu_ps(y + c0 + 16 * full, tail, acc[full]);
  }
}

}  // namespace pk
