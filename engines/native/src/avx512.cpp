// AVX-512F kernels (compiled with -mavx512f -mfma): 16 inputs per step. The kept values of a
// 16-input word are loaded contiguously (16 of them: the value buffers are padded) and put into
// their lanes by a permutation looked up from the word's mask; x is loaded under the word's lanes.
// Int8 values are widened to floats and multiplied by their block's scale first.
#include <immintrin.h>

#include "kernels.h"
#include "mask_tables.h"
#include "simd.h"

namespace pk {
namespace {


// Rows of int8 values are a quarter of the bytes of float ones, so the next rows' fetch starts this
// many blocks of rows ahead (4 was chosen over 1, 2 and 8 by ad-hoc timing on the AVX-512 EPYC; no
// committed benchmark compares them).
constexpr int64_t kInt8Ahead = 4;

// Sixteen int8 codes as floats (the caller's buffers are padded: a full 16-byte load never leaves them).
inline __m512 int8x16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }

// Weight streams are short (a row of a small matrix is ~1 KB, too short for the hardware
// prefetcher to ramp up): while a block of rows computes, the next block's rows are prefetched a
// cache line per word, so DRAM latency overlaps the arithmetic.
// RB output rows at once (independent accumulation chains hide the FMA and expand latencies),
// MM rows of x each. Q: int8 values with a scale per block of inputs (kernels.h), a 16-input word
// always inside one block.
template <bool Dense, bool Q, int MM, int RB>
void block(const Bitmask& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, KW = (K + 15) / 16, full = K / 16;
  const float* v[RB];
  const int8_t* q[RB];
  const float* sc[RB];
  const uint16_t* mk[RB];
  __m512 acc[RB][MM];
  const char* next[RB];  // the next block's rows: fetched a line per word while this block computes
  const int shift = Q ? block_shift(w.q) : 0;
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    const int64_t ahead = Q ? kInt8Ahead * RB : RB;
    const int64_t nn = n + ahead + r < w.N ? n + ahead + r : n + r;
    if (Q) {
      q[r] = row_qvalues(w, n + r);
      sc[r] = row_scales(K, w.q, n + r);
      next[r] = reinterpret_cast<const char*>(row_qvalues(w, nn));
    } else {
      v[r] = row_values(w, n + r);
      next[r] = reinterpret_cast<const char*>(row_values(w, nn));
    }
    if (!Dense) {
      mk[r] = row_masks(w, n + r);
      _mm_prefetch(reinterpret_cast<const char*>(row_masks(w, nn)), _MM_HINT_T0);
    }
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t word = 0; word < KW; ++word) {
    __m512 xv[MM];
    // the last, partial word: load x under its real lanes only
    const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) xv[m] = _mm512_maskz_loadu_ps(lanes, x + m * ldx + word * 16);
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if (Dense) {  // a dense row is 64 (float) or 16 (int8) bytes per word: prefetch all of it
        __m512 wv;
        if (Q) {
          if ((word & 3) == 0) _mm_prefetch(next[r] + word * 16, _MM_HINT_T0);
          // lanes past K hold padding or the next row's codes: x is zero there
          wv = _mm512_mul_ps(int8x16(q[r]), _mm512_set1_ps(sc[r][(word * 16) >> shift]));
          q[r] += 16;
        } else {
          _mm_prefetch(next[r] + word * 64, _MM_HINT_T0);
          wv = _mm512_maskz_loadu_ps(lanes, v[r]);
          v[r] += 16;
        }
        PK_UNROLL
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        continue;
      }
      _mm_prefetch(next[r] + word * (Q ? 16 : 64), _MM_HINT_T0);
      const __mmask16 bits = mk[r][word];
#ifndef PK_BITMASK_PERMUTE
#define PK_BITMASK_PERMUTE 1  // faster than vexpandps on the AVX-512 EPYC in ad-hoc timing (not a committed benchmark)
#endif
      const __m512 packed = Q ? int8x16(q[r]) : _mm512_loadu_ps(v[r]);
#if PK_BITMASK_PERMUTE
      __m512 wv = _mm512_maskz_permutexvar_ps(bits, lanes_of(bits), packed);
#else
      __m512 wv = _mm512_maskz_expand_ps(bits, packed);
#endif
      if (Q) {
        wv = _mm512_mul_ps(wv, _mm512_set1_ps(sc[r][(word * 16) >> shift]));
        q[r] += __builtin_popcount(bits);
      } else {
        v[r] += __builtin_popcount(bits);
      }
      PK_UNROLL
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <int MM>
void rows(const Bitmask& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_storage(dense(w), int8(w.q), [&](auto d, auto q) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) block<decltype(d)::value, decltype(q)::value, MM, 4>(w, x, ldx, y, ldy, n);
    for (; n < n1; ++n) block<decltype(d)::value, decltype(q)::value, MM, 1>(w, x, ldx, y, ldy, n);
  });
}

void gemv(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

}  // namespace

void gemv_avx512(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  gemv(w, x, M, ldx, y, ldy, n0, n1);
}

}  // namespace pk
