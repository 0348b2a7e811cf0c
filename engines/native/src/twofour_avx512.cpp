// 2:4 kernel, AVX-512F: two kept values of every four inputs, read as they are stored (values
// float[N][K/2], positions uint8[N][ceil(K/8)], 2 bits per kept value). A 32-input window of a row
// holds exactly 16 kept values, one full vector; their x values are picked out of the window's 32
// inputs by one two-source permutation whose indices come from the window's 32 position bits
// (index of kept value j = 4·(j/2) + its 2-bit position). No expand, no zero lanes: half the FMAs
// of a dense row, and the 4-bit-per-group side data is all that is read besides the values.
// Int8 values (kernels.h) are widened and scaled per window: a quarter of the value bytes.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// The 32 position bits of window `win` of a row (fewer bytes in a partial last window).
inline uint32_t window_bits(const uint8_t* row, int64_t win, int64_t row_bytes) {
  const int64_t at = win * 4, left = row_bytes - at;
  uint32_t p = 0;
  if (left >= 4) std::memcpy(&p, row + at, 4);  // a single 32-bit load
  else std::memcpy(&p, row + at, size_t(left));
  return p;
}

#ifndef PK_AHEAD
#define PK_AHEAD 1
#endif
constexpr int64_t kAhead = PK_AHEAD;  // blocks of rows between the one computed and the one prefetched
constexpr int64_t kInt8Ahead = 4;     // the same for int8 values (as avx512.cpp)

// The window's 16 kept values as floats: fp32 as stored, or int8 codes times their scales (a 32-input
// window is inside one block of ≥ 32 inputs, or its two halves in two blocks of 16). `vals` masks the
// values of a partial last window (the buffers are padded, so the full loads stay inside them).
template <bool Q>
inline __m512 window_values(const TwoFour& w, const float* v, const int8_t* q, const float* sc, int shift, int64_t win, __mmask16 vals) {
  if (!Q) return _mm512_maskz_loadu_ps(vals, v + win * 16);
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + win * 16))));
  __m512 scale;
  if (w.q.block >= 32) {
    scale = _mm512_set1_ps(sc[(win * 32) >> shift]);
  } else {  // block 16: kept values 0-7 are inputs 0-15 of the window, 8-15 inputs 16-31
    const int64_t b = win * 2, blocks = scale_blocks(w.K, w.q);
    scale = _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(sc[b]), _mm512_set1_ps(b + 1 < blocks ? sc[b + 1] : 0.f));
  }
  return _mm512_maskz_mul_ps(vals, codes, scale);
}

template <bool Q, int MM, int RB>
void block(const TwoFour& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, windows = (K + 31) / 32, full = K / 32, half_k = K / 2, pb = position_bytes(K);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  const int64_t value_bytes = Q ? 1 : 4;
  const int shift = Q ? block_shift(w.q) : 0;
  const char* base_values = Q ? reinterpret_cast<const char*>(w.q.values) : reinterpret_cast<const char*>(w.values);
  const float* v[RB];
  const int8_t* q[RB];
  const float* sc[RB];
  const uint8_t* p[RB];
  const char* next[RB];
  __m512 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    v[r] = Q ? nullptr : w.values + (n + r) * half_k;
    q[r] = Q ? w.q.values + (n + r) * half_k : nullptr;
    sc[r] = Q ? row_scales(K, w.q, n + r) : nullptr;
    p[r] = w.positions + (n + r) * pb;
    const int64_t ahead = (Q ? kInt8Ahead : kAhead) * RB;  // int8 rows are a quarter of the bytes: fetch further ahead
    const int64_t nn = n + ahead + r < w.N ? n + ahead + r : n + r;
    next[r] = base_values + nn * half_k * value_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(w.positions + nn * pb), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t win = 0; win < windows; ++win) {
    // lanes of x and of the kept values that exist in this window (all but in a partial last one)
    const int64_t in_left = K - win * 32;
    const __mmask16 xlo = in_left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << in_left) - 1u);
    const __mmask16 xhi = in_left >= 32 ? __mmask16(0xFFFF) : in_left <= 16 ? __mmask16(0) : __mmask16((1u << (in_left - 16)) - 1u);
    const __mmask16 vals = win < full ? __mmask16(0xFFFF) : __mmask16((1u << (in_left / 2)) - 1u);
    __m512 x0[MM], x1[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      x0[m] = _mm512_maskz_loadu_ps(xlo, x + m * ldx + win * 32);
      x1[m] = _mm512_maskz_loadu_ps(xhi, x + m * ldx + win * 32 + 16);
    }
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if (!Q || (win & 3) == 0) _mm_prefetch(next[r] + win * 16 * value_bytes, _MM_HINT_T0);
      const uint32_t bits = window_bits(p[r], win, pb);
      // base + (field & 3) as one ternary-logic op ((A & B) | C: base's low two bits are zero)
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(int(bits)), shifts), three, base, 0xEA);
      const __m512 wv = window_values<Q>(w, v[r], q[r], sc[r], shift, win, vals);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_permutex2var_ps(x0[m], idx, x1[m]), acc[r][m]);
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <bool Q, int MM>
void rows(const TwoFour& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<Q, MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<Q, MM, 1>(w, x, ldx, y, ldy, n);
}

}  // namespace

void gemv_twofour_avx512(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { int8(w.q) ? rows<true, decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1)
                                                            : rows<false, decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

}  // namespace pk
