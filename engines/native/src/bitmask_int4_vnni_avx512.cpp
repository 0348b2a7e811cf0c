// Bitmask with 4-bit values × 16-bit activations, AVX-512 VNNI + VBMI + VBMI2 (compiled with those
// flags; pk::BitmaskInt4 with row_sums, pk::X16 in kernels.h). The float kernel (bitmask_int4_avx512.cpp)
// spends three permutations, a widening and an FMA on every 16 inputs of a row whatever their density:
// it reads fewer bytes than the dense 4-bit kernel and computes more. Here a row's group of 64 inputs
// costs the same few instructions at any density: its codes (32 bytes, two a byte in kept order) are
// spread to one byte each (`vpmovzxdq` puts four code bytes in each qword, `vpmultishiftqb` picks each
// nibble to a byte, an AND keeps it), moved to their inputs' lanes by `vpexpandb` under the group's
// 64-bit mask, the zero point subtracted in the kept lanes only (the others stay 0: w = code − zero, a
// signed byte), and two `vpdpbusd` add w · xh and w · xl into 16 lanes — x as a 16-bit integer xq
// rounded to 1/32639 of the token's largest |x| and stored as xq + 32768 = 256 · xh + xl, two unsigned
// bytes. Per block of the grid the integer sums (h · 256 + l, exact) become float and are scaled by
// the block's scale; at the end y = sx · (Σ − 32768 · Σ_k W[n][k]): the offset's products are the row's
// sum of its values, computed when the weight is loaded (row_sums). Needs block % 64 == 0. Not bit-exact
// (each input rounded to 1/32639 of the largest |x|: relative error ≤ 1.6e-5 of it).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // blocks of rows ahead for the next rows' codes and masks (as the other kernels; not tuned)
constexpr int kX16Max = 32639;  // |xq| at most: xq + 32768 + 128 stays below 65536 (the int4_x_vnni kernel's bound)

// The group's kept values (code − zero, signed bytes) in their inputs' lanes, 0 elsewhere.
inline __m512i group_weights(const uint8_t* codes, __mmask64 bits, __m512i zero, __m512i ctrl, __m512i nib) {
  const __m512i wide = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));  // qword i: code bytes 4i..4i+3
  const __m512i spread = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, wide), nib);                   // byte j of qword i: code 8i + j
  return _mm512_maskz_sub_epi8(bits, _mm512_maskz_expand_epi8(bits, spread), zero);
}

template <int MM, int RB>
void block(const BitmaskInt4& w, const X16& x, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, KW = (K + 15) / 16, G = (K + 63) / 64, nb = (K + w.block - 1) / w.block, gpb = w.block / 64;
  // the last group's mask words beyond K's are the next row's: only its own words count
  const uint64_t last = KW % 4 ? (uint64_t(1) << (16 * (KW % 4))) - 1 : ~uint64_t(0);
  const __m512i ctrl = _mm512_set1_epi64(0x1C1814100C080400LL), nib = _mm512_set1_epi8(15);
  const uint8_t* q[RB];
  const uint16_t* mk[RB];
  const uint8_t* next[RB];
  const uint16_t* next_mk[RB];
  __m512 f[RB][MM];
  __m512i h[RB][MM], l[RB][MM], zero[RB];
  float scale[RB];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = w.codes + w.row_off[n + r];
    mk[r] = w.masks + (n + r) * KW;
    const int64_t nn = n + kAhead * RB + r < w.N ? n + kAhead * RB + r : n + r;
    next[r] = w.codes + w.row_off[nn];
    next_mk[r] = w.masks + nn * KW;
    _mm_prefetch(reinterpret_cast<const char*>(w.scales + nn * nb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.zeros + nn * nb), _MM_HINT_T0);
    scale[r] = 0.f;
    zero[r] = _mm512_setzero_si512();
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      f[r][m] = _mm512_setzero_ps();
      h[r][m] = l[r][m] = _mm512_setzero_si512();
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    if (g % gpb == 0) {  // a new block of the grid: fold the last one's sums, take this one's scale and zero point
      const int64_t b = g / gpb;
      PK_UNROLL
      for (int r = 0; r < RB; ++r) {
        if (g) {
          const __m512 s = _mm512_set1_ps(scale[r]);
          PK_UNROLL
          for (int m = 0; m < MM; ++m) {
            f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h[r][m], 8), l[r][m])), s, f[r][m]);
            h[r][m] = l[r][m] = _mm512_setzero_si512();
          }
        }
        scale[r] = w.scales[(n + r) * nb + b];
        zero[r] = _mm512_set1_epi8(char(w.zeros[(n + r) * nb + b]));
      }
    }
    __m512i xh[MM], xl[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      xh[m] = _mm512_loadu_si512(x.hi + m * x.ld + 64 * g);
      xl[m] = _mm512_loadu_si512(x.lo + m * x.ld + 64 * g);
    }
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if ((g & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(next[r] + 16 * g), _MM_HINT_T0);  // ≈ 32 code bytes per 2 groups at half density
      if ((g & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_mk[r] + 4 * g), _MM_HINT_T0);
      uint64_t bits;
      std::memcpy(&bits, mk[r] + 4 * g, 8);
      if (g == G - 1) bits &= last;
      const __m512i wv = group_weights(q[r], __mmask64(bits), zero[r], ctrl, nib);
      q[r] += (_mm_popcnt_u64(bits) + 1) / 2;
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        h[r][m] = _mm512_dpbusd_epi32(h[r][m], xh[m], wv);
        l[r][m] = _mm512_dpbusd_epi32(l[r][m], xl[m], wv);
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    const __m512 s = _mm512_set1_ps(scale[r]);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h[r][m], 8), l[r][m])), s, f[r][m]);
      y[m * ldy + n + r] = x.scale[m] * (hsum(f[r][m]) - 32768.f * w.row_sums[n + r]);
    }
  }
}

template <int MM>
void rows(const BitmaskInt4& w, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int RB = MM == 1 ? 4 : (MM == 2 ? 2 : 1);  // accumulators: 3 · RB · MM registers
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) block<MM, RB>(w, x, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1>(w, x, y, ldy, n);
}

}  // namespace

void quantize_x16_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, const X16& out) {
  const int64_t G = (K + 63) / 64;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * ldx;
    __m512 most = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1u);
      most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, row + k)));
    }
    const float top = _mm512_reduce_max_ps(most);
    out.scale[m] = top > 0.f ? top / float(kX16Max) : 0.f;
    const __m512 inv = _mm512_set1_ps(top > 0.f ? float(kX16Max) / top : 0.f);
    const __m512i lo_most = _mm512_set1_epi32(-kX16Max), hi_most = _mm512_set1_epi32(kX16Max), offset = _mm512_set1_epi32(32768);
    uint8_t* hi = out.hi + m * out.ld;
    uint8_t* lo = out.lo + m * out.ld;
    for (int64_t k = 0; k < 64 * G; k += 16) {
      const __mmask16 lanes = k >= K ? __mmask16(0) : (K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1u));
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + k), inv));  // round to nearest even
      v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo_most), hi_most), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(_mm512_and_si512(v, _mm512_set1_epi32(255))));
    }
  }
}

void gemv_bitmask_int4_x16_avx512(const BitmaskInt4& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t mm = M - m < 4 ? M - m : 4;
    const X16 xm{x.hi + m * x.ld, x.lo + m * x.ld, x.scale + m, x.ld};
    float* ym = y + m * ldy;
    if (mm == 1) rows<1>(w, xm, ym, ldy, n0, n1);
    else if (mm == 2) rows<2>(w, xm, ym, ldy, n0, n1);
    else if (mm == 3) rows<3>(w, xm, ym, ldy, n0, n1);
    else rows<4>(w, xm, ym, ldy, n0, n1);
  }
}

}  // namespace pk
