// Bitmask with 4-bit values (kernels.h, BitmaskInt4), AVX-512F: as avx512.cpp's bitmask kernel, with a
// word's kept values rebuilt from its codes first: 16 nibbles read (word_nibbles), interleaved into 16
// bytes in value order (low nibble of byte i = value 2i, high = 2i + 1), widened, looked up in the
// block's table of its 16 values ((code − zero) · scale rounded once), then put in their lanes by the
// permutation of the word's mask. The values and
// the order of the sums are the float32 bitmask kernel's: its result bit for bit.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "mask_tables.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // blocks of rows ahead for the next rows' codes (as int4_avx512.cpp; not tuned by measurement)

inline int64_t grid_blocks(const BitmaskInt4& w) { return (w.K + w.block - 1) / w.block; }

// A word's code bytes as 16 dword indices whose low 4 bits are its codes in value order (byte i, then
// byte i shifted right by 4: the bits above the nibble are ignored by the permutation reading them).
inline __m512i word_codes(const uint8_t* group, int nib) {
  const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(word_nibbles(group, nib)));
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, _mm_srli_epi16(v, 4)));
}

template <int MM, int RB>
void block(const BitmaskInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, KW = (K + 15) / 16, full = K / 16, nb = grid_blocks(w);
  const int shift = __builtin_ctzll(uint64_t(w.block));
  const uint8_t* q[RB];
  const uint16_t* mk[RB];
  const float* sc[RB];
  const uint8_t* zp[RB];
  const uint8_t* next[RB];
  int nib[RB];  // kept values of the current group before this word
  __m512 acc[RB][MM];
  __m512 table[RB];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = w.codes + w.row_off[n + r];
    nib[r] = 0;
    mk[r] = w.masks + (n + r) * KW;
    sc[r] = w.scales + (n + r) * nb;
    zp[r] = w.zeros + (n + r) * nb;
    const int64_t nn = n + kAhead * RB + r < w.N ? n + kAhead * RB + r : n + r;
    next[r] = w.codes + w.row_off[nn];
    _mm_prefetch(reinterpret_cast<const char*>(w.masks + nn * KW), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.scales + nn * nb), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t word = 0; word < KW; ++word) {
    __m512 xv[MM];
    const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) xv[m] = _mm512_maskz_loadu_ps(lanes, x + m * ldx + word * 16);
    const int64_t g = (word * 16) >> shift;
    if (((word * 16) & (w.block - 1)) == 0)  // a new block: its 16 values
      PK_UNROLL
      for (int r = 0; r < RB; ++r) table[r] = value_table<true>(sc[r][g], float(zp[r][g]));
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if ((word & 7) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(next[r] + word * 4), _MM_HINT_T0);  // ≈ 4 code bytes per word at half density
        _mm_prefetch(reinterpret_cast<const char*>(mk[r] + word + 32), _MM_HINT_T0);
      }
      if ((word & 3) == 0) {  // a new group of codes starts on a byte
        q[r] += (nib[r] + 1) / 2;
        nib[r] = 0;
      }
      const uint32_t bits = mk[r][word];
      const __m512 wv = _mm512_maskz_permutexvar_ps(__mmask16(bits), lanes_of(bits), _mm512_permutexvar_ps(word_codes(q[r], nib[r]), table[r]));
      nib[r] += __builtin_popcount(bits);
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
void rows(const BitmaskInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1>(w, x, ldx, y, ldy, n);
}

}  // namespace

void gemv_bitmask_int4_avx512(const BitmaskInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

void decompress_avx512(const BitmaskInt4& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, KW = (K + 15) / 16, full = K / 16, nb = grid_blocks(w);
  const int shift = __builtin_ctzll(uint64_t(w.block));
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    const uint8_t* q = w.codes + w.row_off[n];
    const uint16_t* mk = w.masks + n * KW;
    __m512 table = _mm512_setzero_ps();
    int nib = 0;
    for (int64_t word = 0; word < KW; ++word) {
      if ((word & 3) == 0) {
        q += (nib + 1) / 2;
        nib = 0;
      }
      const int64_t g = (word * 16) >> shift;
      if (((word * 16) & (w.block - 1)) == 0) table = value_table<true>(w.scales[n * nb + g], float(w.zeros[n * nb + g]));  // a new block
      const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
      const __m512 v = _mm512_permutexvar_ps(word_codes(q, nib), table);
      _mm512_mask_storeu_ps(row + word * 16, lanes, _mm512_maskz_expand_ps(__mmask16(mk[word]), v));
      nib += __builtin_popcount(mk[word]);
    }
  }
}

}  // namespace pk
