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
// (integers below 2^24: exact); at the block's end × scale · qs, plus offset · Σ vals. PAIRS pairs of
// 32-output chunks per tile, each pair one 32-byte load per row: [low nibbles | high nibbles] come out of
// the load already split by chunk, lane by lane — 20 instructions per 128 weights where the float
// kernel above takes 14 per 32. (A tile's rows lie 64 bytes apart in their block: one base pointer.)
template <int PAIRS>
inline void int8_sums(const ActiveInputs& a, int64_t p0, int64_t p1, const uint8_t* base, __m256 acc[]) {
  const __m256i nib = _mm256_set1_epi8(15);
  for (int64_t p = p0; p < p1;) {
    __m256i sum[4 * PAIRS];
    for (int j = 0; j < 4 * PAIRS; ++j) sum[j] = _mm256_setzero_si256();
    const int64_t end = p1 - p < 16 ? p1 : p + 16;
    for (; p < end; p += 2) {
      const bool two = p + 1 < end;
      const uint8_t* ra = base + (a.idx[p] & 31) * 64;
      const uint8_t* rb = two ? base + (a.idx[p + 1] & 31) * 64 : ra;
      _mm_prefetch(reinterpret_cast<const char*>(ra + kInt4xAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(rb + kInt4xAhead), _MM_HINT_T0);
      const uint16_t qa = uint8_t(a.q[p]), qb = two ? uint8_t(a.q[p + 1]) : 0;
      const __m256i xp = _mm256_set1_epi16(int16_t(qa | (qb << 8)));
      PK_UNROLL
      for (int c = 0; c < PAIRS; ++c) {
        const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + 32 * c));
        const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 32 * c));
        // lane 0 chunk 2c, lane 1 chunk 2c + 1: low nibbles outputs 0-15, high nibbles 16-31
        const __m256i la = _mm256_and_si256(va, nib), ha = _mm256_and_si256(_mm256_srli_epi16(va, 4), nib);
        const __m256i lb = _mm256_and_si256(vb, nib), hb = _mm256_and_si256(_mm256_srli_epi16(vb, 4), nib);
        sum[4 * c] = _mm256_add_epi16(sum[4 * c], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(la, lb), xp));          // outputs 0-7
        sum[4 * c + 1] = _mm256_add_epi16(sum[4 * c + 1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(la, lb), xp));  // 8-15
        sum[4 * c + 2] = _mm256_add_epi16(sum[4 * c + 2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ha, hb), xp));  // 16-23
        sum[4 * c + 3] = _mm256_add_epi16(sum[4 * c + 3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ha, hb), xp));  // 24-31
      }
    }
    for (int c = 0; c < PAIRS; ++c)
      for (int h = 0; h < 4; ++h) {  // lane 0 → chunk 2c, lane 1 → chunk 2c + 1
        const __m256i v = sum[4 * c + h];
        acc[8 * c + h] = _mm256_add_ps(acc[8 * c + h], _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v))));
        acc[8 * c + 4 + h] = _mm256_add_ps(acc[8 * c + 4 + h], _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1))));
      }
  }
}

// One chunk of 32 outputs (a tile's odd last one): its 16 bytes per row split into [0-15 | 16-31].
inline void int8_sums_one(const ActiveInputs& a, int64_t p0, int64_t p1, const uint8_t* base, __m256 acc[]) {
  const __m256i nib = _mm256_set1_epi8(15);
  for (int64_t p = p0; p < p1;) {
    __m256i sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    const int64_t end = p1 - p < 16 ? p1 : p + 16;
    for (; p < end; p += 2) {
      const bool two = p + 1 < end;
      const uint8_t* ra = base + (a.idx[p] & 31) * 64;
      const uint8_t* rb = two ? base + (a.idx[p + 1] & 31) * 64 : ra;
      const uint16_t qa = uint8_t(a.q[p]), qb = two ? uint8_t(a.q[p + 1]) : 0;
      const __m256i xp = _mm256_set1_epi16(int16_t(qa | (qb << 8)));
      const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra)), vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rb));
      const __m256i ca = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(va, 4), va), nib);
      const __m256i cb = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(vb, 4), vb), nib);
      sum[0] = _mm256_add_epi16(sum[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ca, cb), xp));  // outputs 0-7 | 16-23
      sum[1] = _mm256_add_epi16(sum[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ca, cb), xp));  // 8-15 | 24-31
    }
    for (int h = 0; h < 2; ++h) {
      acc[h] = _mm256_add_ps(acc[h], _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum[h]))));
      acc[2 + h] = _mm256_add_ps(acc[2 + h], _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum[h], 1))));
    }
  }
}

template <bool HALF>
inline void tile_int8(const Int4InputMajor& w, const ActiveInputs& a, int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float xs,
                      int64_t chunks, float* out) {
  __m256 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm256_setzero_ps();
  const uint8_t* base = input_codes(w, a.idx[p0] & ~int32_t(31), at);  // row k of the tile: base + (k % 32) · 64
  if (chunks == 4) int8_sums<2>(a, p0, p1, base, acc);
  else if (chunks >= 2) int8_sums<1>(a, p0, p1, base, acc);
  if (chunks & 1) int8_sums_one(a, p0, p1, base + 16 * (chunks - 1), acc + 4 * (chunks - 1));
  const __m256 sx = _mm256_set1_ps(a.qs[p0]), xsv = _mm256_set1_ps(xs);
  for (int j = 0; j < 4 * chunks; ++j) {
    const __m256 sv = grid8<HALF>(s, j), ov = grid8<HALF>(o, j), y = _mm256_loadu_ps(out + 8 * j);
    _mm256_storeu_ps(out + 8 * j, w.zero_point ? _mm256_fmadd_ps(sv, _mm256_fnmadd_ps(ov, xsv, _mm256_mul_ps(sx, acc[j])), y)
                                               : _mm256_fmadd_ps(_mm256_mul_ps(sv, sx), acc[j], _mm256_fmadd_ps(ov, xsv, y)));
  }
}

}  // namespace

void gemv_int4_x_int8_avx2(const Int4InputMajor& w, const ActiveInputs& a, float* out) {
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for_each_block_tile(w, a, 4, out, [&](int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float sum, int64_t chunks, float* y) {
      tile_int8<H>(w, a, p0, p1, at, s, o, sum, chunks, y);
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
