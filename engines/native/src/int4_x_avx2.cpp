// Activation-sparse GEMV with input-major 4-bit weights, AVX2 + FMA + F16C (pk::Int4InputMajor, kernels.h):
// as int4_x_avx512.cpp with vectors of 8 (tiles of up to 64 outputs, 8 accumulators); with int8
// activations (the int8_activations option) by vpmaddubsw on pairs of active inputs. Also the prefill path's
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

// int8 activations: two active inputs at a time, their codes interleaved byte by byte per output and
// multiplied by the pair (q_a, q_b) with vpmaddubsw (code_a · q_a + code_b · q_b in 16 bits), summed in
// 16 bits over at most 8 pairs (|sum| ≤ 8 · 2 · 15 · 127 < 2^15), then widened into float accumulators
// (integers below 2^24: exact); at the block's end × scale · qs, plus offset · Σ vals. 14 instructions
// per 64 weights where the float kernel above takes 14 per 32.
template <int C, bool HALF>
inline void tile_int8(const Int4InputMajor& w, const ActiveInputs& a, int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float xs,
                      float* out) {
  __m256 acc[4 * C];
  for (int j = 0; j < 4 * C; ++j) acc[j] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi8(15);
  for (int64_t p = p0; p < p1;) {
    __m256i sum[2 * C];
    for (int j = 0; j < 2 * C; ++j) sum[j] = _mm256_setzero_si256();
    const int64_t end = p1 - p < 16 ? p1 : p + 16;
    for (; p < end; p += 2) {
      const bool two = p + 1 < end;
      const uint8_t* ra = input_codes(w, a.idx[p], at);
      const uint8_t* rb = two ? input_codes(w, a.idx[p + 1], at) : ra;
      _mm_prefetch(reinterpret_cast<const char*>(ra + kInt4xAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(rb + kInt4xAhead), _MM_HINT_T0);
      const uint16_t qa = uint8_t(a.q[p]), qb = two ? uint8_t(a.q[p + 1]) : 0;
      const __m256i xp = _mm256_set1_epi16(int16_t(qa | (qb << 8)));
      for (int c = 0; c < C; ++c) {
        const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra + 16 * c));
        const __m128i vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rb + 16 * c));
        // [outputs 0-15 | 16-31] of the chunk, one code per byte
        const __m256i ca = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(va, 4), va), nib);
        const __m256i cb = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(vb, 4), vb), nib);
        sum[2 * c] = _mm256_add_epi16(sum[2 * c], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ca, cb), xp));          // outputs 0-7 | 16-23
        sum[2 * c + 1] = _mm256_add_epi16(sum[2 * c + 1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ca, cb), xp));  // 8-15 | 24-31
      }
    }
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < 2; ++h) {
        const __m256i v = sum[2 * c + h];
        acc[4 * c + h] = _mm256_add_ps(acc[4 * c + h], _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v))));
        acc[4 * c + 2 + h] = _mm256_add_ps(acc[4 * c + 2 + h], _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1))));
      }
  }
  const __m256 sx = _mm256_set1_ps(a.qs[p0]), xsv = _mm256_set1_ps(xs);
  for (int j = 0; j < 4 * C; ++j) {
    const __m256 sv = grid8<HALF>(s, j), ov = grid8<HALF>(o, j), y = _mm256_loadu_ps(out + 8 * j);
    _mm256_storeu_ps(out + 8 * j, w.zero_point ? _mm256_fmadd_ps(sv, _mm256_fnmadd_ps(ov, xsv, _mm256_mul_ps(sx, acc[j])), y)
                                               : _mm256_fmadd_ps(_mm256_mul_ps(sv, sx), acc[j], _mm256_fmadd_ps(ov, xsv, y)));
  }
}

}  // namespace

void gemv_int4_x_int8_avx2(const Int4InputMajor& w, const ActiveInputs& a, float* out) {
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for_each_block_tile(w, a, 2, out, [&](int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float sum, int64_t chunks, float* y) {
      if (chunks == 2) tile_int8<2, H>(w, a, p0, p1, at, s, o, sum, y);
      else tile_int8<1, H>(w, a, p0, p1, at, s, o, sum, y);
    });
  });
}

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
