// Decompression of rows to dense, AVX-512F (the prefill path multiplies dense tiles): each 16-input
// word's kept values are expanded into their lanes by the word's mask and stored. A 2:4 word's mask
// comes from its two position bytes through a 256-entry table (a byte = two groups = 8 inputs).
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

}  // namespace

void decompress_avx512(const Bitmask& w, int64_t n0, int64_t n1, float* out) {
  if (int8(w.q)) return decompress(w, n0, n1, out);  // int8 values: the scalar path
  const int64_t K = w.K, KW = words(w), full = K / 16;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    const float* v = row_values(w, n);
    if (dense(w)) {
      for (int64_t k = 0; k < K; ++k) row[k] = v[k];
      continue;
    }
    const uint16_t* mk = row_masks(w, n);
    for (int64_t word = 0; word < KW; ++word) {
      const __mmask16 bits = mk[word];
      const int c = __builtin_popcount(bits);
      const __m512 wv = _mm512_maskz_expand_ps(bits, _mm512_maskz_loadu_ps(__mmask16((1u << c) - 1u), v));
      const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
      _mm512_mask_storeu_ps(row + word * 16, lanes, wv);
      v += c;
    }
  }
}

void decompress_avx512(const TwoFour& w, int64_t n0, int64_t n1, float* out) {
  if (int8(w.q)) return decompress(w, n0, n1, out);  // int8 values: the scalar path
  const int64_t K = w.K, KW = (K + 15) / 16, full = K / 16, pb = position_bytes(K);
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    const float* v = w.values + n * (K / 2);
    const uint8_t* p = w.positions + n * pb;
    for (int64_t word = 0; word < KW; ++word) {
      uint32_t lo = kPosToMask[p[2 * word]], hi = 2 * word + 1 < pb ? kPosToMask[p[2 * word + 1]] : 0u;
      if (word == KW - 1 && (K % 8) == 4) {  // the unused high half of the row's last byte
        if (2 * word + 1 < pb) hi &= 0x0Fu;
        else lo &= 0x0Fu;
      }
      const __mmask16 bits = __mmask16(lo | (hi << 8));
      const int c = __builtin_popcount(bits);
      const __m512 wv = _mm512_maskz_expand_ps(bits, _mm512_maskz_loadu_ps(__mmask16((1u << c) - 1u), v));
      const __mmask16 lanes = word < full ? __mmask16(0xFFFF) : __mmask16((1u << (K % 16)) - 1u);
      _mm512_mask_storeu_ps(row + word * 16, lanes, wv);
      v += c;
    }
  }
}

}  // namespace pk
