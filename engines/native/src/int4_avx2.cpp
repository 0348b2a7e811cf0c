// 4-bit dense weights (kernels.h, Int4Dense), AVX2 + FMA: a block of 32 inputs is 16 code bytes,
// widened 8 at a time; bytes 0-7 give inputs 0-7 (low nibbles) and 16-23 (high), bytes 8-15 give
// 8-15 and 24-31. The weights are rebuilt exactly and multiplied in the float32 dense kernel's order
// (avx2.cpp: 8 inputs at a time, in input order), so the result is that kernel's bit for bit.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

template <bool ZP, bool HALF, int MM, int RB>
void block(const Int4Dense& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, nb = K / kInt4Block;
  const uint8_t* q[RB];
  const float* sc[RB];
  const float* of[RB];
  __m256 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = row_codes(w, n + r);
    sc[r] = row_grid(w, w.scales, n + r);
    of[r] = row_grid(w, w.offsets, n + r);
    if (n + 4 * RB + r < w.N) _mm_prefetch(reinterpret_cast<const char*>(row_codes(w, n + 4 * RB + r)), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  const __m256i low = _mm256_set1_epi32(15);
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t bn = nb - b0 < 16 ? nb - b0 : 16;
    const GridChunk<HALF, RB> g(w, sc, of, b0, bn);
    const auto &S = g.S, &O = g.O;
    for (int64_t b = b0; b < b0 + bn; ++b) {
      PK_UNROLL
      for (int r = 0; r < RB; ++r) {
        if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(q[r] + b * 16 + 256), _MM_HINT_T0);
        const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + b * 16)));
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + b * 16 + 8)));
        const __m256 s = _mm256_set1_ps(S[r][b - b0]), o = _mm256_set1_ps(O[r][b - b0]);
        const __m256 w[4] = {
            int4_weights<ZP>(_mm256_and_si256(v0, low), s, o),  // inputs 0-7
            int4_weights<ZP>(_mm256_and_si256(v1, low), s, o),  // 8-15
            int4_weights<ZP>(_mm256_srli_epi32(v0, 4), s, o),   // 16-23
            int4_weights<ZP>(_mm256_srli_epi32(v1, 4), s, o),   // 24-31
        };
        PK_UNROLL
        for (int part = 0; part < 4; ++part)
          PK_UNROLL
          for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_fmadd_ps(w[part], _mm256_loadu_ps(x + m * ldx + b * 32 + part * 8), acc[r][m]);
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <bool ZP, bool HALF, int MM>
void rows(const Int4Dense& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<ZP, HALF, MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<ZP, HALF, MM, 1>(w, x, ldx, y, ldy, n);
}

}  // namespace

void gemv_int4_avx2(const Int4Dense& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_int4_grid(w, [&](auto zp, auto half) {
    by_chunks_of_four(M, [&](auto mm, int64_t m) {
      rows<decltype(zp)::value, decltype(half)::value, decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1);
    });
  });
}

void decompress_avx2(const Int4Dense& w, int64_t n0, int64_t n1, float* out) {
  const __m256i low = _mm256_set1_epi32(15);
  for_each_int4_block(w, n0, n1, out, [&](const uint8_t* q, float scale, float offset, float* dst) {
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
    const __m256i c[4] = {_mm256_and_si256(v0, low), _mm256_and_si256(v1, low), _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)};
    for (int part = 0; part < 4; ++part)  // inputs 0-7, 8-15, 16-23, 24-31
      _mm256_storeu_ps(dst + 8 * part, w.zero_point ? int4_weights<true>(c[part], s, o) : int4_weights<false>(c[part], s, o));
  });
}

}  // namespace pk
