// Lookup tables of the bitmask kernels, by mask byte m: `perm[m][j]`, the packed value lane j takes (the
// count of set bits below j; 0 where bit j is clear), `select[m][j]`, all ones where bit j is set, and
// `prefix[c][j]`, all ones in the first c lanes. Internal linkage: every kernel file that includes it has
// its own copy. Computed at compile time (constexpr), never by a constructor at load: a constructor in an
// AVX-512 file is compiled with AVX-512 instructions and would run, and fault, on an AVX2-only CPU.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pk {
namespace {

struct MaskTables {
  alignas(32) int32_t perm[256][8]{};
  alignas(32) int32_t select[256][8]{};
  alignas(32) int32_t prefix[9][8]{};
  constexpr MaskTables() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int j = 0; j < 8; ++j) {
        const bool on = (m >> j) & 1;
        perm[m][j] = on ? c : 0;
        select[m][j] = on ? -1 : 0;
        c += on;
      }
    }
    for (int c = 0; c <= 8; ++c)
      for (int j = 0; j < 8; ++j) prefix[c][j] = j < c ? -1 : 0;
  }
};
constexpr MaskTables kMask{};

#ifdef __AVX512F__
// The 16 lane indices that put a 16-bit word's packed values in the lanes of its set bits.
inline __m512i lanes_of(uint32_t bits) {
  const uint32_t lo = bits & 0xFFu, hi = bits >> 8;
  const __m256i ilo = _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.perm[lo]));
  const __m256i ihi = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.perm[hi])), _mm256_set1_epi32(__builtin_popcount(lo)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(ilo), ihi, 1);
}
#endif

}  // namespace
}  // namespace pk
