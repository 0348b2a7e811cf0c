// 2:4 with 4-bit values × 16-bit activations, AVX-512 VNNI + VBMI (compiled with those flags;
// pk::TwoFourInt4 with row_sums, pk::X16 in kernels.h). The float kernel (twofour_int4_avx512.cpp)
// computes 16 kept values per 32 inputs with a table lookup, a permutation of x and an FMA; here a step
// of 128 inputs (four windows, 64 kept values) of a row costs about ten instructions, proportional to
// the kept values rather than the inputs:
//   codes: the four windows' 32 code bytes, each window's qword copied into the two 64-bit lanes that
//          hold its 16 values (`vpermq`), each value's nibble moved to its own byte (`vpmultishiftqb`),
//          masked to 4 bits and the zero point subtracted (w = code − zero, a signed byte);
//   inputs: the window's 2-bit positions, broadcast 16 bytes a step (a load), each value's field moved to
//          its byte (`vpmultishiftqb`), and base | field (`vpternlogd`) is its input within the step;
//          the inputs' two bytes picked out of the step's 128 (`vpermi2b`, two sources) — no zero lanes;
//   two `vpdpbusd` add w · xh and w · xl into 16 lanes (x as in bitmask_int4_vnni_avx512.cpp:
//          xq + 32768 = 256 · xh + xl, the token's one scale).
// The 64-bit lane L holds window 2 · (L & 1) + (L >> 2), values 8 · ((L >> 1) & 1) .. + 7: the lane's own
// qword of the broadcast positions then holds its window's bits, so the positions need no shuffle.
// Per block of the grid the exact integer sums (h · 256 + l) become float times the block's scale (blocks
// of 32 or 64: a scale per lane, every step); at the end y = sx · (Σ − 32768 · Σ_k W[n][k]) with the row's
// sum of its values computed when the weight is loaded (row_sums). Not bit-exact: each input is rounded
// to 1/32639 of the token's largest |x|, as in the bitmask kernel.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // blocks of rows ahead for the next rows' codes and positions (as the other kernels; not tuned)

// The lane map above: window and first value of 64-bit lane L.
constexpr int window_of(int L) { return 2 * (L & 1) + (L >> 2); }
constexpr int half_of(int L) { return (L >> 1) & 1; }

struct Consts {
  __m512i code_lanes;  // vpermq: lane L ← the window's code qword
  __m512i code_shift;  // vpmultishiftqb: byte i of lane L ← the nibble of value 8h + i (nibble 8·(j & 1) + (j >> 1))
  __m512i pos_shift;   // vpmultishiftqb: byte i of lane L ← the 2 bits of value j = 8h + i (bit 32 · (L >> 2) + 2j of the lane's qword)
  __m512i base;        // byte i of lane L: the input of value j's group within the step, 32 · window + 4 · (j >> 1)
  __m512i nib, three;
  __m512i grid_bytes[2], grid_lanes[2];  // blocks of 32 [0] / 64 [1]: each byte's / dword lane's block within the step
  Consts() {
    alignas(64) uint8_t cs[64], ps[64], b[64], gb[2][64];
    alignas(64) int64_t cl[8];
    alignas(64) int32_t gl[2][16];
    for (int L = 0; L < 8; ++L) {
      const int win = window_of(L), h = half_of(L);
      cl[L] = win;
      for (int wide = 0; wide < 2; ++wide) {
        for (int i = 0; i < 8; ++i) gb[wide][8 * L + i] = uint8_t(win >> wide);
        gl[wide][2 * L] = gl[wide][2 * L + 1] = win >> wide;
      }
      for (int i = 0; i < 8; ++i) {
        const int j = 8 * h + i;
        cs[8 * L + i] = uint8_t(4 * (8 * (j & 1) + (j >> 1)));
        ps[8 * L + i] = uint8_t(32 * (L >> 2) + 2 * j);
        b[8 * L + i] = uint8_t(32 * win + 4 * (j >> 1));
      }
    }
    code_lanes = _mm512_load_si512(cl);
    code_shift = _mm512_load_si512(cs);
    pos_shift = _mm512_load_si512(ps);
    base = _mm512_load_si512(b);
    nib = _mm512_set1_epi8(0x0F);
    three = _mm512_set1_epi8(3);
    for (int wide = 0; wide < 2; ++wide) {
      grid_bytes[wide] = _mm512_load_si512(gb[wide]);
      grid_lanes[wide] = _mm512_load_si512(gl[wide]);
    }
  }
};

// Bytes (64-bit lanes) and dword lanes of the step's first `windows` windows.
inline __mmask64 window_bytes(int windows) {
  uint64_t m = 0;
  for (int L = 0; L < 8; ++L)
    if (window_of(L) < windows) m |= uint64_t(0xFF) << (8 * L);
  return __mmask64(m);
}

// The step's grid for blocks of 32 or 64 inputs: each lane's window's block's zero point (bytes) and
// scale (dword lanes), from the row's entries from block b0 (`count` ≤ 4 of them exist).
__attribute__((always_inline)) inline void lane_grid(const Consts& c, int wide, const float* sc, const uint8_t* zp, int64_t b0, int64_t count, __m512i& zero, __m512& scale) {
  const __mmask16 k = __mmask16((1u << count) - 1u);
  zero = _mm512_permutexvar_epi8(c.grid_bytes[wide], _mm512_castsi128_si512(_mm_maskz_loadu_epi8(k, zp + b0)));
  scale = _mm512_permutexvar_ps(c.grid_lanes[wide], _mm512_castps128_ps512(_mm_maskz_loadu_ps(__mmask8(k), sc + b0)));
}

template <int MM, int RB>
struct Acc {
  __m512i h[RB][MM], l[RB][MM];
  __m512 f[RB][MM];
};

// One step (inputs 128 s .. 128 s + 127) of rows q/p into the integer sums.
template <int MM, int RB, bool PARTIAL>
__attribute__((always_inline)) inline void step(Acc<MM, RB>& a, const Consts& c, const uint8_t* const* q, const uint8_t* const* p, const X16& x, int64_t s, int windows,
                 const __m512i* zero) {
  __m512i xh0[MM], xh1[MM], xl0[MM], xl1[MM];
  PK_UNROLL
  for (int m = 0; m < MM; ++m) {
    xh0[m] = _mm512_loadu_si512(x.hi + m * x.ld + 128 * s);
    xh1[m] = _mm512_loadu_si512(x.hi + m * x.ld + 128 * s + 64);
    xl0[m] = _mm512_loadu_si512(x.lo + m * x.ld + 128 * s);
    xl1[m] = _mm512_loadu_si512(x.lo + m * x.ld + 128 * s + 64);
  }
  const __mmask64 kept = PARTIAL ? window_bytes(windows) : ~__mmask64(0);
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    const __m256i cq = !PARTIAL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + 32 * s))
                                : _mm256_maskz_loadu_epi8(__mmask32((uint64_t(1) << (8 * windows)) - 1), q[r] + 32 * s);
    const __m128i pq = !PARTIAL ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + 16 * s))
                                : _mm_maskz_loadu_epi8(__mmask16((1u << (4 * windows)) - 1u), p[r] + 16 * s);
    const __m512i codes = _mm512_multishift_epi64_epi8(c.code_shift, _mm512_permutexvar_epi64(c.code_lanes, _mm512_castsi256_si512(cq)));
    const __m512i wv = PARTIAL ? _mm512_maskz_sub_epi8(kept, _mm512_and_si512(codes, c.nib), zero[r]) : _mm512_sub_epi8(_mm512_and_si512(codes, c.nib), zero[r]);
    const __m512i fields = _mm512_multishift_epi64_epi8(c.pos_shift, _mm512_broadcast_i32x4(pq));
    const __m512i idx = _mm512_ternarylogic_epi32(fields, c.three, c.base, 0xEA);  // (fields & 3) | base
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      a.h[r][m] = _mm512_dpbusd_epi32(a.h[r][m], _mm512_permutex2var_epi8(xh0[m], idx, xh1[m]), wv);
      a.l[r][m] = _mm512_dpbusd_epi32(a.l[r][m], _mm512_permutex2var_epi8(xl0[m], idx, xl1[m]), wv);
    }
  }
}

// The integer sums into the float ones, times the scales; the integer sums restart.
template <int MM, int RB>
__attribute__((always_inline)) inline void fold(Acc<MM, RB>& a, const __m512* scale) {
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      a.f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(a.h[r][m], 8), a.l[r][m])), scale[r], a.f[r][m]);
      a.h[r][m] = a.l[r][m] = _mm512_setzero_si512();
    }
}

// Rows n .. n + RB − 1. SB > 0: blocks of 128 · SB inputs (a zero point and scale broadcast per block);
// SB == 0: blocks of 32 or 64 (a zero point and scale per lane, every step).
template <int MM, int RB, int SB>
void block(const TwoFourInt4& w, const Consts& c, const X16& x, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, S = (K + 127) / 128, nb = grid_blocks(w);
  const int last_windows = int((K / 32) % 4 ? (K / 32) % 4 : 4);
  const uint8_t* q[RB];
  const uint8_t* p[RB];
  const float* sc[RB];
  const uint8_t* zp[RB];
  const uint8_t* next_q[RB];
  const uint8_t* next_p[RB];
  Acc<MM, RB> a;
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = row_codes(w, n + r);
    p[r] = row_positions(w, n + r);
    sc[r] = row_scales(w, n + r);
    zp[r] = row_zeros(w, n + r);
    const int64_t nn = n + kAhead * RB + r < w.N ? n + kAhead * RB + r : n + r;
    next_q[r] = row_codes(w, nn);
    next_p[r] = row_positions(w, nn);
    _mm_prefetch(reinterpret_cast<const char*>(row_scales(w, nn)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row_zeros(w, nn)), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      a.h[r][m] = a.l[r][m] = _mm512_setzero_si512();
      a.f[r][m] = _mm512_setzero_ps();
    }
  }
  __m512i zero[RB];
  __m512 scale[RB];
  const int wide = w.block == 64;  // blocks of 32 (0) or 64 (1) with SB == 0
  const int64_t per_step = 4 >> wide;  // grid entries a step spans
  for (int64_t s = 0; s < S; ++s) {
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if ((s & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_q[r] + 32 * s), _MM_HINT_T0);  // two steps = one 64-byte line
      if ((s & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_p[r] + 16 * s), _MM_HINT_T0);
      if constexpr (SB == 0) {
        const int64_t b0 = per_step * s;
        lane_grid(c, wide, sc[r], zp[r], b0, nb - b0 < per_step ? nb - b0 : per_step, zero[r], scale[r]);
      } else if (s % SB == 0) {
        zero[r] = _mm512_set1_epi8(char(zp[r][s / SB]));
        scale[r] = _mm512_set1_ps(sc[r][s / SB]);
      }
    }
    if (s + 1 == S && last_windows < 4)
      step<MM, RB, true>(a, c, q, p, x, s, last_windows, zero);
    else
      step<MM, RB, false>(a, c, q, p, x, s, 4, zero);
    if (SB == 0 || (s + 1) % SB == 0 || s + 1 == S) fold<MM, RB>(a, scale);
  }
  PK_UNROLL
  for (int m = 0; m < MM; ++m) {
    if constexpr (RB == 4) {
      const __m128 sums = _mm_sub_ps(hsum4(a.f[0][m], a.f[1][m], a.f[2][m], a.f[3][m]), _mm_mul_ps(_mm_set1_ps(32768.f), _mm_loadu_ps(w.row_sums + n)));
      _mm_storeu_ps(y + m * ldy + n, _mm_mul_ps(_mm_set1_ps(x.scale[m]), sums));
    } else {
      PK_UNROLL
      for (int r = 0; r < RB; ++r) y[m * ldy + n + r] = x.scale[m] * (hsum(a.f[r][m]) - 32768.f * w.row_sums[n + r]);
    }
  }
}

template <int MM, int SB>
void rows_of(const TwoFourInt4& w, const Consts& c, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int RB = MM == 1 ? 4 : (MM == 2 ? 2 : 1);  // accumulators: 3 · RB · MM registers
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) block<MM, RB, SB>(w, c, x, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1, SB>(w, c, x, y, ldy, n);
}

template <int MM>
void rows(const TwoFourInt4& w, const Consts& c, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (w.block <= 64) rows_of<MM, 0>(w, c, x, y, ldy, n0, n1);
  else if (w.block == 128) rows_of<MM, 1>(w, c, x, y, ldy, n0, n1);
  else if (w.block == 256) rows_of<MM, 2>(w, c, x, y, ldy, n0, n1);
  else rows_of<MM, 4>(w, c, x, y, ldy, n0, n1);  // 512 (checked by the caller: twofour_int4_x16)
}

}  // namespace

void gemv_twofour_int4_x16_avx512(const TwoFourInt4& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const Consts c;
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t mm = M - m < 4 ? M - m : 4;
    const X16 xm{x.hi + m * x.ld, x.lo + m * x.ld, x.scale + m, x.ld};
    float* ym = y + m * ldy;
    if (mm == 1) rows<1>(w, c, xm, ym, ldy, n0, n1);
    else if (mm == 2) rows<2>(w, c, xm, ym, ldy, n0, n1);
    else if (mm == 3) rows<3>(w, c, xm, ym, ldy, n0, n1);
    else rows<4>(w, c, xm, ym, ldy, n0, n1);
  }
}

}  // namespace pk
