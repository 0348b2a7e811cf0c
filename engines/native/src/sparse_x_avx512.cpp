// Activation-sparse GEMV, AVX-512F: y[N] = Σ_{k active} x_k · Wᵀ[k, :] with the weight stored
// input-major (Wᵀ, K rows of N), so each active input reads one contiguous row and an inactive one
// is never read. A task owns a range of output columns and streams, four active rows at a time,
// through that range of each row (y stays in L1 between rows); the next rows are prefetched.
#include <immintrin.h>

#include "kernels.h"

namespace pk {

void gemv_sparse_x_avx512(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0, full = width / 16;
  const __mmask16 tail = __mmask16((1u << (width % 16)) - 1u);
  for (int64_t j = 0; j <= full; ++j) {
    if (j < full) _mm512_storeu_ps(y + n0 + 16 * j, _mm512_setzero_ps());
    else if (tail) _mm512_mask_storeu_ps(y + n0 + 16 * j, tail, _mm512_setzero_ps());
  }
  int64_t a = 0;
  for (; a < count; a += 4) {
    const int64_t m = count - a < 4 ? count - a : 4;
    const float* r[4];
    __m512 xv[4];
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t s = i < m ? a + i : a;  // a short last group repeats its first row with weight 0
      r[i] = wt + int64_t(idx[s]) * N + n0;
      xv[i] = _mm512_set1_ps(i < m ? vals[s] : 0.f);
    }
    // prefetch the next group's ranges (a line per 16 columns of each row)
    for (int64_t i = 0; i < 4 && a + 4 + i < count; ++i) {
      const char* p = reinterpret_cast<const char*>(wt + int64_t(idx[a + 4 + i]) * N + n0);
      for (int64_t b = 0; b < width * 4; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
    }
    for (int64_t j = 0; j < full; ++j) {
      __m512 acc = _mm512_loadu_ps(y + n0 + 16 * j);
      for (int i = 0; i < 4; ++i) acc = _mm512_fmadd_ps(xv[i], _mm512_loadu_ps(r[i] + 16 * j), acc);
      _mm512_storeu_ps(y + n0 + 16 * j, acc);
    }
    if (tail) {
      __m512 acc = _mm512_maskz_loadu_ps(tail, y + n0 + 16 * full);
      for (int i = 0; i < 4; ++i) acc = _mm512_fmadd_ps(xv[i], _mm512_maskz_loadu_ps(tail, r[i] + 16 * full), acc);
      _mm512_mask_storeu_ps(y + n0 + 16 * full, tail, acc);
    }
  }
}

}  // namespace pk
