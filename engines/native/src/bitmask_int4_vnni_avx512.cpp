// Bitmask with 4-bit values × 16-bit activations, AVX-512 VNNI + VBMI2 (compiled with those
// flags; pk::BitmaskInt4 with row_sums, pk::X16 in kernels.h). The float kernel (bitmask_int4_avx512.cpp)
// spends three permutations, a widening and an FMA on every 16 inputs of a row whatever their density:
// it reads fewer bytes than the dense 4-bit kernel and computes more. Here a row's group of 64 inputs
// costs the same few instructions at any density: its codes (32 bytes, two a byte in kept order) are
// spread to one byte each (`vpmovzxbw`, then (w | w << 4) & 0x0F0F by one `vpternlogd`), moved to their
// inputs' lanes by `vpexpandb` under the group's 64-bit mask, the zero point subtracted in the kept lanes
// only (the others stay 0: w = code − zero, a signed byte), and two `vpdpbusd` add w · xh and w · xl
// into 16 lanes — x as a 16-bit integer xq rounded to 1/32639 of the token's largest |x| and stored as
// xq + 32768 = 256 · xh + xl, two unsigned bytes. Per block of the grid the integer sums (h · 256 + l,
// exact) become float and are scaled by the block's scale; at the end y = sx · (Σ − 32768 · Σ_k W[n][k]): the offset's products are the row's
// sum of its values, computed when the weight is loaded (row_sums). Needs block 32 or a multiple of 64.
// Not bit-exact (each input rounded to 1/32639 of the largest |x|: an error ≤ 1.6e-5 of that |x|).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // blocks of rows ahead for the next rows' codes and masks (as the other kernels; not tuned)
constexpr int kX16Max = 32639;  // |xq| at most (the input-major 16-bit kernel's bound; here xq + 32768 < 65536 needs only 32767)

// The group's kept values (code − zero, signed bytes) in their inputs' lanes, 0 elsewhere.
inline __m512i group_weights(const uint8_t* codes, __mmask64 bits, __m512i zero, __m512i nibs) {
  const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));  // word i: code byte i
  // (w | w << 4) & 0x0F0F: byte 2i = code 2i (low nibble), byte 2i + 1 = code 2i + 1 (high nibble)
  const __m512i spread = _mm512_ternarylogic_epi32(wide, _mm512_slli_epi16(wide, 4), nibs, 0xA8);
  return _mm512_maskz_sub_epi8(bits, _mm512_maskz_expand_epi8(bits, spread), zero);
}

// A row block's running state (rows n .. n + RB − 1).
template <int MM, int RB>
struct Rows {
  const uint8_t* q[RB];  // each row's codes of its next group
  __m512 f[RB][MM];      // float sums of the blocks so far
};

// Groups [g0, g1) of one block of the grid (row r's zero point in every byte of zero[r], its scale in
// every lane of scale[r]; blocks of 32: the two blocks' in the halves) into st.f. With G1 > 0 the block
// has exactly G1 groups (fully unrolled: no accumulator is carried by a loop).
template <int MM, int RB, int G1, bool PARTIAL>
inline void grid_block(Rows<MM, RB>& st, const uint16_t* mk, int64_t KW, const X16& x, int64_t g0, int64_t g1, uint64_t own_last, int64_t G,
                       const __m512i* zero, const __m512* scale) {
  const __m512i nibs = _mm512_set1_epi16(0x0F0F);
  __m512i h[RB][MM], l[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) h[r][m] = l[r][m] = _mm512_setzero_si512();
  auto group = [&](int64_t g) __attribute__((always_inline)) {
    __m512i xh[MM], xl[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      xh[m] = _mm512_loadu_si512(x.hi + m * x.ld + 64 * g);
      xl[m] = _mm512_loadu_si512(x.lo + m * x.ld + 64 * g);
    }
    const uint64_t own = !PARTIAL || g != G - 1 ? ~uint64_t(0) : own_last;
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      uint64_t bits;
      std::memcpy(&bits, mk + r * KW + 4 * g, 8);
      bits &= own;
      const __m512i wv = group_weights(st.q[r], _cvtu64_mask64(bits), zero[r], nibs);
      st.q[r] += (_mm_popcnt_u64(bits) + 1) / 2;
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        h[r][m] = _mm512_dpbusd_epi32(h[r][m], xh[m], wv);
        l[r][m] = _mm512_dpbusd_epi32(l[r][m], xl[m], wv);
      }
    }
  };
  if constexpr (G1 > 0) {
    PK_UNROLL
    for (int i = 0; i < G1; ++i) group(g0 + i);
  } else {
    for (int64_t g = g0; g < g1; ++g) group(g);
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)  // the block's exact integer sums (h · 256 + l) into float, times its scale
    PK_UNROLL
    for (int m = 0; m < MM; ++m) st.f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h[r][m], 8), l[r][m])), scale[r], st.f[r][m]);
}

template <int MM, int RB, int GPB>
void block(const BitmaskInt4& w, const X16& x, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, KW = (K + 15) / 16, G = (K + 63) / 64, nb = (K + w.block - 1) / w.block, gpb = w.block / 64;  // (gpb 0: blocks of 32)
  // a last group with mask words beyond K's (they are the next row's) is masked to its own words
  const uint64_t last = KW % 4 ? (uint64_t(1) << (16 * (KW % 4))) - 1 : ~uint64_t(0);
  const uint16_t* mk = w.masks + n * KW;  // row r's: mk + r · KW
  const float* sc = w.scales + n * nb;
  const uint8_t* zp = w.zeros + n * nb;
  const int64_t ahead = n + kAhead * RB < w.N ? kAhead * RB : 0;  // the rows whose codes and masks are prefetched meanwhile
  Rows<MM, RB> st;
  int64_t to_next[RB];  // from row n + r's codes to row n + r + ahead's
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    st.q[r] = w.codes + w.row_off[n + r];
    const int64_t nn = n + r + ahead < w.N ? n + r + ahead : n + r;
    to_next[r] = w.row_off[nn] - w.row_off[n + r];
    _mm_prefetch(reinterpret_cast<const char*>(w.scales + nn * nb), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.zeros + nn * nb), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) st.f[r][m] = _mm512_setzero_ps();
  }
  __m512i zero[RB];
  __m512 scale[RB];
  // One step of the grid per iteration: a block of gpb groups (one scale and zero point per row) or, in
  // blocks of 32 inputs, one group holding two blocks (lanes 0-7 and bytes 0-31 the first; nb may end after it).
  constexpr bool kHalves = GPB < 0;
  constexpr int G1 = kHalves ? 1 : GPB;  // groups per step known at compile time (0: a loop over them)
  const int64_t step = kHalves ? 1 : gpb;
  for (int64_t g0 = 0, b = 0; g0 < G; g0 += step, b += kHalves ? 2 : 1) {
    const int64_t b1 = kHalves && b + 1 < nb ? b + 1 : b;
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      // the next rows' codes from where this row's are now, their masks of this step
      _mm_prefetch(reinterpret_cast<const char*>(st.q[r] + to_next[r] + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mk + (r + ahead) * KW + 4 * g0), _MM_HINT_T0);
      if constexpr (kHalves) {
        zero[r] = _mm512_mask_blend_epi8(__mmask64(0xFFFFFFFF00000000ULL), _mm512_set1_epi8(char(zp[r * nb + b])), _mm512_set1_epi8(char(zp[r * nb + b1])));
        scale[r] = _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(sc[r * nb + b]), _mm512_set1_ps(sc[r * nb + b1]));
      } else {
        zero[r] = _mm512_set1_epi8(char(zp[r * nb + b]));
        scale[r] = _mm512_set1_ps(sc[r * nb + b]);
      }
    }
    if (g0 + step >= G)  // the last step: its last group may be partial
      grid_block<MM, RB, kHalves ? 1 : 0, true>(st, mk, KW, x, g0, G, last, G, zero, scale);
    else if constexpr (G1 > 0)
      grid_block<MM, RB, G1, false>(st, mk, KW, x, g0, g0 + step, last, G, zero, scale);
    else
      grid_block<MM, RB, 0, false>(st, mk, KW, x, g0, g0 + step, last, G, zero, scale);
  }
  PK_UNROLL
  for (int m = 0; m < MM; ++m) {
    if constexpr (RB == 4) {
      const __m128 sums = _mm_sub_ps(hsum4(st.f[0][m], st.f[1][m], st.f[2][m], st.f[3][m]), _mm_mul_ps(_mm_set1_ps(32768.f), _mm_loadu_ps(w.row_sums + n)));
      _mm_storeu_ps(y + m * ldy + n, _mm_mul_ps(_mm_set1_ps(x.scale[m]), sums));
    } else {
      PK_UNROLL
      for (int r = 0; r < RB; ++r) y[m * ldy + n + r] = x.scale[m] * (hsum(st.f[r][m]) - 32768.f * w.row_sums[n + r]);
    }
  }
}

template <int MM, int GPB>
void rows_of(const BitmaskInt4& w, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int RB = MM == 1 ? 4 : (MM == 2 ? 2 : 1);  // accumulators: 3 · RB · MM registers
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) block<MM, RB, GPB>(w, x, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1, GPB>(w, x, y, ldy, n);
}

// Blocks of 64 and 128 inputs unrolled whole, larger ones loop over their groups, two blocks of 32 a group.
template <int MM>
void rows(const BitmaskInt4& w, const X16& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (w.block == 32) rows_of<MM, -1>(w, x, y, ldy, n0, n1);
  else if (w.block == 64) rows_of<MM, 1>(w, x, y, ldy, n0, n1);
  else if (w.block == 128) rows_of<MM, 2>(w, x, y, ldy, n0, n1);
  else rows_of<MM, 0>(w, x, y, ldy, n0, n1);
}

}  // namespace

void quantize_x16_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, const X16& out) {
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
    for (int64_t k = 0; k < out.ld; k += 16) {  // inputs from K to ld: xq = 0
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
