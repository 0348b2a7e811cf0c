// 2:4 with 4-bit values × 16-bit activations, AVX-512 VNNI + VBMI (compiled with those flags;
// pk::TwoFourInt4 with row_sums in the paired layout, pk::X16 in kernels.h). The float kernel
// (twofour_int4_avx512.cpp) spends a table lookup, a two-source permutation of x and an FMA on every 16
// kept values; here one vector holds two rows' 32 kept values of a step of 64 inputs (two windows), 64
// products per two `vpdpbusd`, and every instruction serves both rows:
//   codes: the pair's 32 code bytes of the step broadcast to both halves of the vector (one load), so
//          each (row, window) qword sits in two 64-bit lanes; each value's nibble moved to its own byte
//          (`vpmultishiftqb`), masked to 4 bits and the zero point subtracted (w = code − zero, a
//          signed byte);
//   inputs: the pair's 16 position bytes of the step broadcast to the four 128-bit lanes (one load),
//          each value's 2-bit field moved to its byte (`vpmultishiftqb`) and base | field
//          (`vpternlogd`) is its input within the step; the inputs' two bytes picked out of the step's
//          64 by `vpermb` (both rows read the same inputs, so one 64-byte table serves them);
//   two `vpdpbusd` add w · xh and w · xl into 16 lanes (x as in bitmask_int4_vnni_avx512.cpp: xq +
//          32768 = 256 · xh + xl, the token's one scale).
// 64-bit lane L holds row L & 1, window (L >> 1) & 1, values 8 · (L >> 2) .. + 7. An earlier version read
// the rows' separate streams and merged the second row's codes and positions in by masked broadcasts
// (two more vector instructions per step; docs/native.md). Per block of the grid the exact integer sums
// (h · 256 + l) become float times the block's scale (blocks of 32: a scale per window, every step);
// at the end y = sx · (Σ − 32768 · Σ_k W[n][k]) with the row's sum of its values computed when the
// weight is loaded (row_sums). Not bit-exact: each input is rounded to 1/32639 of the token's largest
// |x|, as in the bitmask kernel.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // blocks of rows ahead for the next rows' codes and positions (as the other kernels; not tuned)

// The lane map's constant tables (64-bit lane L: row L & 1, window (L >> 1) & 1, values j = 8 · (L >> 2) + i
// for its bytes i), computed at compile time.
struct Tables {
  alignas(64) uint8_t code_shift[64];    // vpmultishiftqb: byte ← value j's nibble (nibble 8·(j & 1) + (j >> 1) of the window's qword)
  alignas(64) uint8_t pos_shift[64];     // vpmultishiftqb: byte ← value j's 2 bits (bit 32 · window + 2j of the row's 8 position bytes)
  alignas(64) uint8_t base[64];          // the input of value j's group within the step, 32 · window + 4 · (j >> 1)
  alignas(64) uint8_t window_bytes[64];  // blocks of 32: each byte's (row, window) entry 2 · row + window of the step's four zero points
  alignas(64) int32_t window_lanes[16];  // and each dword lane's of its four scales
  constexpr Tables() : code_shift(), pos_shift(), base(), window_bytes(), window_lanes() {
    for (int L = 0; L < 8; ++L) {
      const int row = L & 1, win = (L >> 1) & 1, h = L >> 2;
      for (int i = 0; i < 8; ++i) {
        const int j = 8 * h + i;
        code_shift[8 * L + i] = uint8_t(4 * (8 * (j & 1) + (j >> 1)));
        pos_shift[8 * L + i] = uint8_t(32 * win + 2 * j);
        base[8 * L + i] = uint8_t(32 * win + 4 * (j >> 1));
        window_bytes[8 * L + i] = uint8_t(2 * row + win);
      }
      window_lanes[2 * L] = window_lanes[2 * L + 1] = 2 * row + win;
    }
  }
};
constexpr Tables kTables{};

struct Consts {
  __m512i code_shift = _mm512_load_si512(kTables.code_shift);
  __m512i pos_shift = _mm512_load_si512(kTables.pos_shift);
  __m512i base = _mm512_load_si512(kTables.base);
  __m512i nib = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
  __m512i window_bytes = _mm512_load_si512(kTables.window_bytes);
  __m512i window_lanes = _mm512_load_si512(kTables.window_lanes);
};

constexpr __mmask8 kSecond = 0xAA;  // 64-bit lanes of the pair's second row
constexpr __mmask16 kSecondLanes = 0xCCCC;  // and its dword lanes
constexpr __mmask64 kFirstWindow = 0x0000FFFF0000FFFFULL;  // bytes of window 0 (a last step of one window)

// Pairs of rows (rows 2i, 2i + 1 of the block; a pair past the rows asked for repeats the last one) and their sums.
template <int MM, int P>
struct Pairs {
  const uint8_t* q[P];  // the pair's first row's codes (row_codes): its steps are kPairStep bytes apart
  const uint8_t* p[P];  // and positions
  const float* sc[P][2];
  const uint8_t* zp[P][2];
  __m512i h[P][MM], l[P][MM];
  __m512 f[P][MM];
};

// One step (inputs 64 s .. 64 s + 63; ONE: only its first window exists, the second's bytes are padding) of the pairs into the integer sums.
template <int MM, int P, bool ONE>
__attribute__((always_inline)) inline void step(Pairs<MM, P>& a, const Consts& c, const X16& x, int64_t s, const __m512i* zero) {
  __m512i xh[MM], xl[MM];
  PK_UNROLL
  for (int m = 0; m < MM; ++m) {
    xh[m] = _mm512_loadu_si512(x.hi + m * x.ld + 64 * s);
    xl[m] = _mm512_loadu_si512(x.lo + m * x.ld + 64 * s);
  }
  PK_UNROLL
  for (int i = 0; i < P; ++i) {
    const __m512i codes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q[i] + kPairStep * s)));
    const __m512i pos = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.p[i] + kPairStep * s)));
    const __m512i sel = _mm512_and_si512(_mm512_multishift_epi64_epi8(c.code_shift, codes), c.nib);
    const __m512i wv = ONE ? _mm512_maskz_sub_epi8(kFirstWindow, sel, zero[i]) : _mm512_sub_epi8(sel, zero[i]);
    const __m512i idx = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(c.pos_shift, pos), c.three, c.base, 0xEA);  // (fields & 3) | base
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      a.h[i][m] = _mm512_dpbusd_epi32(a.h[i][m], _mm512_permutexvar_epi8(idx, xh[m]), wv);
      a.l[i][m] = _mm512_dpbusd_epi32(a.l[i][m], _mm512_permutexvar_epi8(idx, xl[m]), wv);
    }
  }
}

// The integer sums into the float ones, times the scales; the integer sums restart.
template <int MM, int P>
__attribute__((always_inline)) inline void fold(Pairs<MM, P>& a, const __m512* scale) {
  PK_UNROLL
  for (int i = 0; i < P; ++i)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      a.f[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(a.h[i][m], 8), a.l[i][m])), scale[i], a.f[i][m]);
      a.h[i][m] = a.l[i][m] = _mm512_setzero_si512();
    }
}

// Row e of a pair's sums (the dword lanes of its 64-bit lanes L & 1 == e) and the four rows of two pairs.
__attribute__((always_inline)) inline __m128 lanes128(__m512 v) {  // the sum of the four 128-bit lanes
  const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
__attribute__((always_inline)) inline __m128 pair_rows(__m512 a, __m512 b) {  // rows (a's 0, 1, b's 0, 1)
  return _mm_hadd_ps(lanes128(a), lanes128(b));
}

// Rows [lo, hi) of the pairs starting at row n (even; lo ≥ n, hi ≤ n + 2P; pairs from the one holding
// row hi − 1 on repeat it, their sums unused). SB > 0: blocks of 64 · SB inputs (a zero point and scale
// per row and block); SB == 0: blocks of 32 (one per window).
template <int MM, int P, int SB>
void rows_block(const TwoFourInt4& w, const Consts& c, const X16& x, float* y, int64_t ldy, int64_t n, int64_t lo, int64_t hi) {
  const int64_t K = w.K, S = (K + 63) / 64;
  const bool one_last = (K / 32) % 2 != 0;
  const int64_t last_pair = (hi - 1 - n) >> 1;
  Pairs<MM, P> a;
  PK_UNROLL
  for (int i = 0; i < P; ++i) {
    const int64_t row = n + 2 * (i < last_pair ? i : last_pair);
    a.q[i] = row_codes(w, row);
    a.p[i] = row_positions(w, row);
    PK_UNROLL
    for (int e = 0; e < 2; ++e) {
      a.sc[i][e] = row_scales(w, row + e);
      a.zp[i][e] = row_zeros(w, row + e);
    }
    const int64_t nn = row + kAhead * 2 * P < w.N ? row + kAhead * 2 * P : row;
    _mm_prefetch(reinterpret_cast<const char*>(row_scales(w, nn)), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      a.h[i][m] = a.l[i][m] = _mm512_setzero_si512();
      a.f[i][m] = _mm512_setzero_ps();
    }
  }
  // the pairs prefetched meanwhile, as a byte distance from a pair's codes (pairs are w.stride bytes apart)
  const int64_t ahead = n + kAhead * 2 * P < w.N ? kAhead * P * w.stride : 0;
  __m512i zero[P];
  __m512 scale[P];
  for (int64_t s = 0; s < S; ++s) {
    PK_UNROLL
    for (int i = 0; i < P; ++i) {
      if ((s & 3) == 0) {  // the three 64-byte lines of four steps ahead
        const char* at = reinterpret_cast<const char*>(a.q[i] + ahead + kPairStep * s);
        _mm_prefetch(at, _MM_HINT_T0);
        _mm_prefetch(at + 64, _MM_HINT_T0);
        _mm_prefetch(at + 128, _MM_HINT_T0);
      }
      if constexpr (SB == 0) {  // blocks of 32: each window its own zero point and scale (a last lone window: the next entries are not the row's)
        uint16_t z0, z1;
        __m128 four;
        if (!(one_last && s + 1 == S)) {
          std::memcpy(&z0, a.zp[i][0] + 2 * s, 2);
          std::memcpy(&z1, a.zp[i][1] + 2 * s, 2);
          four = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(a.sc[i][0] + 2 * s)), reinterpret_cast<const double*>(a.sc[i][1] + 2 * s)));
        } else {
          z0 = a.zp[i][0][2 * s];
          z1 = a.zp[i][1][2 * s];
          four = _mm_setr_ps(a.sc[i][0][2 * s], 0.f, a.sc[i][1][2 * s], 0.f);
        }
        zero[i] = _mm512_permutexvar_epi8(c.window_bytes, _mm512_castsi128_si512(_mm_cvtsi32_si128(int(uint32_t(z0) | uint32_t(z1) << 16))));
        scale[i] = _mm512_permutexvar_ps(c.window_lanes, _mm512_castps128_ps512(four));
      } else if (s % SB == 0) {
        const int64_t b = s / SB;
        zero[i] = _mm512_mask_blend_epi64(kSecond, _mm512_set1_epi8(char(a.zp[i][0][b])), _mm512_set1_epi8(char(a.zp[i][1][b])));
        scale[i] = _mm512_mask_blend_ps(kSecondLanes, _mm512_set1_ps(a.sc[i][0][b]), _mm512_set1_ps(a.sc[i][1][b]));
      }
    }
    if (one_last && s + 1 == S)
      step<MM, P, true>(a, c, x, s, zero);
    else
      step<MM, P, false>(a, c, x, s, zero);
    if (SB <= 1 || (s + 1) % SB == 0 || s + 1 == S) fold<MM, P>(a, scale);
  }
  PK_UNROLL
  for (int m = 0; m < MM; ++m) {
    if constexpr (P % 2 == 0) {
      if (lo == n && hi == n + 2 * P) {
        PK_UNROLL
        for (int i = 0; i < P; i += 2) {
          const int64_t r0 = n + 2 * i;
          _mm_storeu_ps(y + m * ldy + r0, _mm_mul_ps(_mm_set1_ps(x.scale[m]), _mm_sub_ps(pair_rows(a.f[i][m], a.f[i + 1][m]),
                                                                                          _mm_mul_ps(_mm_set1_ps(32768.f), _mm_loadu_ps(w.row_sums + r0)))));
        }
        continue;
      }
    }
    PK_UNROLL
    for (int i = 0; i < P; ++i) {
      alignas(16) float rows4[4];
      _mm_store_ps(rows4, pair_rows(a.f[i][m], a.f[i][m]));
      PK_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int64_t r = n + 2 * i + e;
        if (r >= lo && r < hi) y[m * ldy + r] = x.scale[m] * (rows4[e] - 32768.f * w.row_sums[r]);
      }
    }
  }
}

template <int MM, int SB>
void rows_of(const TwoFourInt4& w, const Consts& c, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  // pairs of rows at a time (accumulators 3 · P · MM registers): four pairs were faster than two at
  // blocks of 64 and no slower at 128 in an ad-hoc timing of one weight (not kept)
  constexpr int P = MM == 1 ? 4 : 1;
  int64_t n = n0 & ~int64_t(1);  // the pair holding row n0
  if (n < n0) {
    rows_block<MM, 1, SB>(w, c, x, y, ldy, n, n0, n0 + 1);
    n += 2;
  }
  for (; n + 2 * P <= n1; n += 2 * P) rows_block<MM, P, SB>(w, c, x, y, ldy, n, n, n + 2 * P);
  for (; n < n1; n += 2) rows_block<MM, 1, SB>(w, c, x, y, ldy, n, n, n + 2 < n1 ? n + 2 : n1);
}

template <int MM>
void rows(const TwoFourInt4& w, const Consts& c, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (w.block == 32) rows_of<MM, 0>(w, c, x, y, ldy, n0, n1);
  else if (w.block == 64) rows_of<MM, 1>(w, c, x, y, ldy, n0, n1);
  else if (w.block == 128) rows_of<MM, 2>(w, c, x, y, ldy, n0, n1);
  else if (w.block == 256) rows_of<MM, 4>(w, c, x, y, ldy, n0, n1);
  else rows_of<MM, 8>(w, c, x, y, ldy, n0, n1);  // 512 (checked by the caller: twofour_int4_x16)
}

}  // namespace

void gemv_twofour_int4_x16_avx512(const TwoFourInt4& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const Consts c;
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const X16 part{x.hi + m * x.ld, x.lo + m * x.ld, x.scale + m, x.ld};
    rows<decltype(mm)::value>(w, c, part, y + m * ldy, ldy, n0, n1);
  });
}

}  // namespace pk
