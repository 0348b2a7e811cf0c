// 4-bit dense weights (kernels.h, Int4Dense), AVX-512F: a block of 32 inputs is 16 code bytes,
// widened to 16 lanes; the low nibbles are inputs 0-15, the high ones 16-31. Each weight is rebuilt
// exactly (fma(code, scale, offset)) and multiplied in the same order as the float32 dense kernel
// (avx512.cpp), so a weight stored here gives the float32 kernel's result bit for bit.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// Rows are an eighth of float rows: the next rows' fetch starts this many blocks of rows ahead (twice
// the int8 kernel's 4, by the row size; not tuned by measurement).
constexpr int64_t kAhead = 8;

template <bool ZP, bool HALF, int MM, int RB>
void block(const Int4Dense& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, nb = K / kInt4Block;
  const Int4Rows<RB> rows(w, n, kAhead);
  const auto &q = rows.q, &sc = rows.sc, &of = rows.of, &next = rows.next;
  __m512 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t bn = nb - b0 < 16 ? nb - b0 : 16;
    const GridChunk<HALF, RB> g(w, sc, of, b0, bn);
    const auto &S = g.S, &O = g.O;
    for (int64_t b = b0; b < b0 + bn; ++b) {
      __m512 x0[MM], x1[MM];
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        x0[m] = _mm512_loadu_ps(x + m * ldx + b * 32);
        x1[m] = _mm512_loadu_ps(x + m * ldx + b * 32 + 16);
      }
      PK_UNROLL
      for (int r = 0; r < RB; ++r) {
        if ((b & 3) == 0) _mm_prefetch(next[r] + b * 16, _MM_HINT_T0);  // 4 blocks = one 64-byte line
        // the codes index the block's 16 weights (a permutation reads the low 4 bits of each lane)
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + b * 16)));
        const __m512 table = value_table<ZP>(S[r][b - b0], O[r][b - b0]);
        const __m512 w0 = _mm512_permutexvar_ps(v, table);
        const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
        PK_UNROLL
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(w0, x0[m], acc[r][m]);
        PK_UNROLL
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(w1, x1[m], acc[r][m]);
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

void gemv_int4_avx512(const Int4Dense& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_int4_grid(w, [&](auto zp, auto half) {
    by_chunks_of_four(M, [&](auto mm, int64_t m) {
      rows<decltype(zp)::value, decltype(half)::value, decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1);
    });
  });
}

void decompress_avx512(const Int4Dense& w, int64_t n0, int64_t n1, float* out) {
  const __m512i low = _mm512_set1_epi32(15);
  for_each_int4_block(w, n0, n1, out, [&](const uint8_t* q, float scale, float offset, float* dst) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_srli_epi32(v, 4);
    _mm512_storeu_ps(dst, w.zero_point ? int4_weights<true>(lo, s, o) : int4_weights<false>(lo, s, o));
    _mm512_storeu_ps(dst + 16, w.zero_point ? int4_weights<true>(hi, s, o) : int4_weights<false>(hi, s, o));
  });
}

}  // namespace pk
