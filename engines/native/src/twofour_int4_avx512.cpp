// 2:4 with 4-bit values (kernels.h, TwoFourInt4), AVX-512F: as twofour_avx512.cpp (a 32-input window
// holds 16 kept values, one vector; their x picked by one two-source permutation from the window's
// position bits), with the 16 values looked up from the window's 8 code bytes in the block's table of
// its 16 values ((code − zero) · scale rounded once). The values are the ones the
// float32 2:4 kernel reads and the products are summed in its order, so a weight stored here gives
// that kernel's result bit for bit while an eighth of its value bytes is read.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// Rows are a sixteenth of the float 2:4 rows' value bytes: fetch further ahead (the int8 2:4 kernel's
// 4 blocks of rows, doubled by the row size as in int4_avx512.cpp; not tuned by measurement).
constexpr int64_t kAhead = 8;

inline int shift_of(const TwoFourInt4& w) { return __builtin_ctzll(uint64_t(w.block)); }

// The window's 8 code bytes (one little-endian qword: kept value j at nibble 8·(j & 1) + (j >> 1), so
// even values fill the low dword and odd ones the high one) as 16 dword lanes whose low 4 bits are the
// codes in value order: the qword broadcast from memory (a load, no shuffle), each lane shifted by its
// nibble's place; the bits above are ignored by the permutation that reads them.
inline __m512i window_codes(const uint8_t* codes) {
  const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  int64_t q;
  std::memcpy(&q, codes, 8);
  return _mm512_srlv_epi32(_mm512_set1_epi64(q), shifts);
}

template <int MM, int RB>
void block(const TwoFourInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, windows = K / 32;
  const int shift = shift_of(w);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  const uint8_t* q[RB];
  const uint8_t* p[RB];
  const float* sc[RB];
  const uint8_t* zp[RB];
  const uint8_t* next_q[RB];
  const uint8_t* next_p[RB];
  __m512 acc[RB][MM];
  __m512 table[RB];
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
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t win = 0; win < windows; ++win) {
    __m512 x0[MM], x1[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      x0[m] = _mm512_loadu_ps(x + m * ldx + win * 32);
      x1[m] = _mm512_loadu_ps(x + m * ldx + win * 32 + 16);
    }
    const int64_t g = (win * 32) >> shift;
    if (((win * 32) & (w.block - 1)) == 0)  // a new block: its 16 values
      PK_UNROLL
      for (int r = 0; r < RB; ++r) table[r] = value_table<true>(sc[r][g], float(zp[r][g]));
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if (prefetch_codes_at(w, win)) _mm_prefetch(reinterpret_cast<const char*>(next_q[r] + code_offset(w, win)), _MM_HINT_T0);
      if (prefetch_positions_at(w, win)) _mm_prefetch(reinterpret_cast<const char*>(next_p[r] + position_offset(w, win)), _MM_HINT_T0);
      uint32_t bits;
      std::memcpy(&bits, p[r] + position_offset(w, win), 4);
      // base + (field & 3) as one ternary-logic op ((A & B) | C: base's low two bits are zero)
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(int(bits)), shifts), three, base, 0xEA);
      const __m512 wv = _mm512_permutexvar_ps(window_codes(q[r] + code_offset(w, win)), table[r]);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_permutex2var_ps(x0[m], idx, x1[m]), acc[r][m]);
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <int MM>
void rows(const TwoFourInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1>(w, x, ldx, y, ldy, n);
}

}  // namespace

void gemv_twofour_int4_avx512(const TwoFourInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

// The 4-bit input mask of each position nibble (two 2-bit positions), for a byte: two groups.
constexpr uint8_t mask_of_byte(int b) {
  return uint8_t((1 << (b & 3)) | (1 << ((b >> 2) & 3)) | ((1 << ((b >> 4) & 3)) << 4) | ((1 << ((b >> 6) & 3)) << 4));
}
struct PosTable {
  uint8_t m[256];
  constexpr PosTable() : m() {
    for (int b = 0; b < 256; ++b) m[b] = mask_of_byte(b);
  }
};
constexpr PosTable kPosToMask{};

// Rows to dense: a window's values 0-7 expanded into the lanes of inputs 0-15 their positions name,
// values 8-15 into inputs 16-31 (every group of a stored 2:4 row names two distinct positions).
void decompress_avx512(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out) {
  __m512 table = _mm512_setzero_ps();
  for_each_two_four_int4_window(w, n0, n1, out, [&](const uint8_t* q, const uint8_t* b, float scale, float zero, bool starts_block, float* dst) {
    if (starts_block) table = value_table<true>(scale, zero);
    const __m512 v = _mm512_permutexvar_ps(window_codes(q), table);
    const __mmask16 lo = __mmask16(kPosToMask.m[b[0]] | (kPosToMask.m[b[1]] << 8));
    const __mmask16 hi = __mmask16(kPosToMask.m[b[2]] | (kPosToMask.m[b[3]] << 8));
    _mm512_storeu_ps(dst, _mm512_maskz_expand_ps(lo, v));
    _mm512_storeu_ps(dst + 16, _mm512_maskz_expand_ps(hi, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2))));
  });
}

}  // namespace pk
