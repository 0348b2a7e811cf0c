// Decompression of rows to dense, AVX-512F (the prefill path multiplies dense tiles): each 16-input
// word's kept values are expanded into their lanes by the word's mask and stored. A 2:4 word's mask
// comes from its two position bytes through a 256-entry table (a byte = two groups = 8 inputs).
// Int8 values are widened and multiplied by their block's scale (a 16-input word is inside one block).
#include <immintrin.h>

#include <array>

#include "kernels.h"

namespace pk {
namespace {

constexpr std::array<uint8_t, 256> make_pos_table() {
  std::array<uint8_t, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int p0 = b & 3, p1 = (b >> 2) & 3, p2 = (b >> 4) & 3, p3 = (b >> 6) & 3;
    t[size_t(b)] = uint8_t((1 << p0) | (1 << p1) | ((1 << p2) << 4) | ((1 << p3) << 4));
  }
  return t;
}
constexpr std::array<uint8_t, 256> kPosToMask = make_pos_table();

// The next `count` (≤ 16) values as floats, from float values or from int8 codes times the scale.
inline __m512 next_values(const float* v, const int8_t* q, int count, float scale) {
  const __mmask16 m = __mmask16((1u << count) - 1u);
  if (!q) return _mm512_maskz_loadu_ps(m, v);
  // a full 16-byte load: the value buffers are padded past the last value
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  return _mm512_maskz_mul_ps(m, codes, _mm512_set1_ps(scale));
}

}  // namespace

void decompress_avx512(const Bitmask& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, KW = words(w), full = K / 16;
  const bool Q = int8(w.q);
  const int shift = Q ? block_shift(w.q) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    auto [v, q, sc, mk] = bitmask_row(w, n);
    for (int64_t word = 0; word < KW; ++word) {
      const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
      const __mmask16 bits = mk ? mk[word] : lanes;
      const int c = __builtin_popcount(bits);
      const __m512 wv = _mm512_maskz_expand_ps(bits, next_values(v, q, c, Q ? sc[(word * 16) >> shift] : 0.f));
      _mm512_mask_storeu_ps(row + word * 16, lanes, wv);
      if (Q) q += mk ? c : 16;
      else v += mk ? c : 16;
    }
  }
}

void decompress_avx512(const TwoFour& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, KW = (K + 15) / 16, full = K / 16, pb = position_bytes(K);
  const bool Q = int8(w.q);
  const int shift = Q ? block_shift(w.q) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    auto [v, q, sc, p] = two_four_row(w, n);
    for (int64_t word = 0; word < KW; ++word) {
      uint32_t lo = kPosToMask[p[2 * word]], hi = 2 * word + 1 < pb ? kPosToMask[p[2 * word + 1]] : 0u;
      if (word == KW - 1 && (K % 8) == 4) {  // the unused high half of the row's last byte
        if (2 * word + 1 < pb) hi &= 0x0Fu;
        else lo &= 0x0Fu;
      }
      const __mmask16 bits = __mmask16(lo | (hi << 8));
      const int c = __builtin_popcount(bits);
      const __m512 wv = _mm512_maskz_expand_ps(bits, next_values(v, q, c, Q ? sc[(word * 16) >> shift] : 0.f));
      const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
      _mm512_mask_storeu_ps(row + word * 16, lanes, wv);
      if (Q) q += c;
      else v += c;
    }
  }
}

}  // namespace pk
