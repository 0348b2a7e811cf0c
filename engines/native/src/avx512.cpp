// AVX-512F kernels (compiled with -mavx512f -mfma): 16 inputs per step. The kept values of a
// 16-input word are loaded contiguously (masked to their count, so nothing past the row is read)
// and expanded into their lanes by the word's mask (vexpandps); x is loaded under the same mask.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// Lane j of a mask byte m takes packed value idx[m][j] (the count of set bits below j).
struct PermTable {
  alignas(32) int32_t idx[256][8];
  PermTable() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int j = 0; j < 8; ++j) idx[m][j] = ((m >> j) & 1) ? c++ : 0;
    }
  }
};
const PermTable kPerm;

// Weight streams are short (a row of a small matrix is ~1 KB, too short for the hardware
// prefetcher to ramp up): while a block of rows computes, the next block's rows are prefetched a
// cache line per word, so DRAM latency overlaps the arithmetic.
// RB output rows at once (independent accumulation chains hide the FMA and expand latencies),
// MM rows of x each.
template <bool Dense, int MM, int RB>
void block(const Bitmask& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, KW = (K + 15) / 16, full = K / 16;
  const float* v[RB];
  const uint16_t* mk[RB];
  __m512 acc[RB][MM];
  const float* next[RB];  // the next block's rows: fetched a line per word while this block computes
  for (int r = 0; r < RB; ++r) {
    v[r] = row_values(w, n + r);
    const int64_t nn = n + RB + r < w.N ? n + RB + r : n + r;
    next[r] = row_values(w, nn);
    if (!Dense) {
      mk[r] = row_masks(w, n + r);
      _mm_prefetch(reinterpret_cast<const char*>(row_masks(w, nn)), _MM_HINT_T0);
    }
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t word = 0; word < KW; ++word) {
    __m512 xv[MM];
    // the last, partial word: load x under its real lanes only
    const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
    for (int m = 0; m < MM; ++m) xv[m] = _mm512_maskz_loadu_ps(lanes, x + m * ldx + word * 16);
    for (int r = 0; r < RB; ++r) {
      if (Dense) {  // a dense row is four times the bytes per word: prefetch all of it
        const char* p = reinterpret_cast<const char*>(next[r] + word * 16);
        _mm_prefetch(p, _MM_HINT_T0);
        const __m512 wv = _mm512_maskz_loadu_ps(lanes, v[r]);
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        v[r] += 16;
        continue;
      }
      _mm_prefetch(reinterpret_cast<const char*>(next[r] + word * 16), _MM_HINT_T0);
      const __mmask16 bits = mk[r][word];
#ifndef PK_BITMASK_PERMUTE
#define PK_BITMASK_PERMUTE 1  // faster than vexpandps on the AVX-512 EPYC in ad-hoc timing (not a committed benchmark)
#endif
#if PK_BITMASK_PERMUTE
      const uint32_t lo = bits & 0xFFu, hi = uint32_t(bits) >> 8;
      const __m256i ilo = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[lo]));
      const __m256i ihi = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[hi])), _mm256_set1_epi32(__builtin_popcount(lo)));
      const __m512 wv = _mm512_maskz_permutexvar_ps(bits, _mm512_inserti64x4(_mm512_castsi256_si512(ilo), ihi, 1), _mm512_loadu_ps(v[r]));
#else
      const __m512 wv = _mm512_maskz_expand_ps(bits, _mm512_loadu_ps(v[r]));
#endif
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      v[r] += __builtin_popcount(bits);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <int MM>
void rows(const Bitmask& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (dense(w)) {
    for (; n + 4 <= n1; n += 4) block<true, MM, 4>(w, x, ldx, y, ldy, n);
    for (; n < n1; ++n) block<true, MM, 1>(w, x, ldx, y, ldy, n);
    return;
  }
  for (; n + 4 <= n1; n += 4) block<false, MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<false, MM, 1>(w, x, ldx, y, ldy, n);
}

void gemv(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

}  // namespace

void gemv_avx512(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  gemv(w, x, M, ldx, y, ldy, n0, n1);
}

}  // namespace pk
