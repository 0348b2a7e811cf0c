// Activation-sparse GEMV with input-major 4-bit weights, AVX2 + FMA + F16C (pk::Int4InputMajor, kernels.h):
// as int4_x_avx512.cpp with vectors of 8 (tiles of up to 64 outputs, 8 accumulators). Also the prefill path's
// decompression of a slab of input rows (used on AVX-512 CPUs too: it is not the hot path).
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// The 32 codes of a chunk's 16 bytes as four vectors of 8: outputs 0-7, 8-15, 16-23, 24-31.
inline void chunk_codes(const uint8_t* r, __m256i v[4]) {
  const __m256i low = _mm256_set1_epi32(15);
  const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r)));
  const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + 8)));
  v[0] = _mm256_and_si256(d0, low);
  v[1] = _mm256_and_si256(d1, low);
  v[2] = _mm256_srli_epi32(d0, 4);
  v[3] = _mm256_srli_epi32(d1, 4);
}

template <int C, bool HALF>  // 32-output chunks in this tile (1 or 2): 4 · C accumulators in registers; the grid's form
inline void tile(const Int4InputMajor& w, const ActiveInputs& a, int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, __m256 xs,
                 float* out) {
  __m256 acc[4 * C];
  for (int j = 0; j < 4 * C; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* r = input_codes(w, a.idx[p], at);
    _mm_prefetch(reinterpret_cast<const char*>(r + kInt4xAhead), _MM_HINT_T0);
    const __m256 xv = _mm256_set1_ps(a.vals[p]);
    for (int q = 0; q < C; ++q) {
      __m256i v[4];
      chunk_codes(r + 16 * q, v);
      for (int h = 0; h < 4; ++h) acc[4 * q + h] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(v[h]), acc[4 * q + h]);
    }
  }
  for (int j = 0; j < 4 * C; ++j) {
    const __m256 sv = grid8<HALF>(s, j), ov = grid8<HALF>(o, j), y = _mm256_loadu_ps(out + 8 * j);
    _mm256_storeu_ps(out + 8 * j, w.zero_point ? _mm256_fmadd_ps(sv, _mm256_fnmadd_ps(ov, xs, acc[j]), y)
                                               : _mm256_fmadd_ps(sv, acc[j], _mm256_fmadd_ps(ov, xs, y)));
  }
}

}  // namespace

void gemv_int4_x_avx2(const Int4InputMajor& w, const ActiveInputs& a, float* out) {
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for_each_block_tile(w, a, 2, out, [&](int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float sum, int64_t chunks, float* y) {
      const __m256 xs = _mm256_set1_ps(sum);
      if (chunks == 2) tile<2, H>(w, a, p0, p1, at, s, o, xs, y);
      else tile<1, H>(w, a, p0, p1, at, s, o, xs, y);
    });
  });
}

void decompress_int4_x_avx2(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for_each_decompress_chunk(w, k0, k1, n0, n1, out, ldo, [&](const uint8_t* r, const uint8_t* s, const uint8_t* o, float* dst) {
      __m256i v[4];
      chunk_codes(r, v);
      for (int h = 0; h < 4; ++h) {
        const __m256 sv = grid8<H>(s, h), ov = grid8<H>(o, h);
        _mm256_storeu_ps(dst + 8 * h, w.zero_point ? int4_weights<true>(v[h], sv, ov) : int4_weights<false>(v[h], sv, ov));
      }
    });
  });
}

}  // namespace pk
