// Helpers shared by the SIMD kernel files. Everything here has internal linkage: each file compiles
// it with its own instruction-set flags, and the linker must never hand one file's copy to another.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

// Fully unroll a loop over a kernel's rows of output or of x before the compiler's scalar replacement
// runs, so arrays of accumulators live in registers (GCC otherwise keeps them in memory and stores
// every accumulator on every step: measured 2-3x slower in kernels reading cached weights).
#if defined(__clang__)
#define PK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define PK_UNROLL _Pragma("GCC unroll 16")
#else
#define PK_UNROLL
#endif

namespace pk {
namespace {

#ifdef __AVX512F__
inline float hsum(__m512 v) {
  __m512 s = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 q = _mm512_castps512_ps128(s);
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
// The sums of each 128-bit lane's four floats, as one vector of four.
inline __m128 lane_sums4(__m512 t) {
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));  // every lane of 128-bit lane i: its sum
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), v));
}
// The sums of four vectors' lanes, as one vector of four.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));  // [a lo + a hi | b lo + b hi] (256-bit halves)
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  return lane_sums4(_mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD)));  // 128-bit lane i: vector i's four partial sums
}
#endif

#ifdef __AVX512F__
// The weights of 4-bit codes (one per lane, 0..15): fma(code, scale, offset), or (code − zero) · scale in
// the zero-point form (ZP), each rounded once — every 4-bit kernel's rebuild of the model's weights.
template <bool ZP>
inline __m512 int4_weights(__m512i codes, __m512 s, __m512 o) {
  const __m512 c = _mm512_cvtepi32_ps(codes);
  return ZP ? _mm512_mul_ps(_mm512_sub_ps(c, o), s) : _mm512_fmadd_ps(c, s, o);
}
// The 16 values a 4-bit block's codes stand for (lane c: code c's weight): a permutation of the table by
// the codes gives the weights (the 4-bit kernels' lookup, in place of a conversion and an FMA per weight).
template <bool ZP>
inline __m512 value_table(float scale, float zero_or_offset) {
  return int4_weights<ZP>(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(scale), _mm512_set1_ps(zero_or_offset));
}
#endif

#ifdef __AVX2__
template <bool ZP>
inline __m256 int4_weights(__m256i codes, __m256 s, __m256 o) {
  const __m256 c = _mm256_cvtepi32_ps(codes);
  return ZP ? _mm256_mul_ps(_mm256_sub_ps(c, o), s) : _mm256_fmadd_ps(c, s, o);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

inline float hmax(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif

#ifdef __AVX512F__
// Values 16j .. 16j + 15 of an input-major 4-bit block's scales or offsets from g (kernels.h,
// Int4InputMajor): floats, or (HALF) fp16 widened exactly.
template <bool HALF>
inline __m512 grid16(const uint8_t* g, int64_t j) {
  if constexpr (HALF) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32 * j)));
  else return _mm512_loadu_ps(reinterpret_cast<const float*>(g) + 16 * j);
}
// An active block's sums for outputs 16j .. 16j + 15 folded into out by the input-major 4-bit kernels:
// out += scale · acc + offset · xs, or with a zero point scale · (acc − zero · xs); acc = Σ x · code
// over the block's active inputs, xs = Σ x (s, o: the block's scales and offsets at the tile's start).
template <bool HALF>
inline void fold16(bool zero_point, const uint8_t* s, const uint8_t* o, int64_t j, __m512 acc, __m512 xs, float* out) {
  const __m512 sv = grid16<HALF>(s, j), ov = grid16<HALF>(o, j), y = _mm512_loadu_ps(out + 16 * j);
  _mm512_storeu_ps(out + 16 * j, zero_point ? _mm512_fmadd_ps(sv, _mm512_fnmadd_ps(ov, xs, acc), y) : _mm512_fmadd_ps(sv, acc, _mm512_fmadd_ps(ov, xs, y)));
}
#elif defined(__AVX2__) && defined(__F16C__)
// Values 8j .. 8j + 7 of the same, by AVX2 and F16C.
template <bool HALF>
inline __m256 grid8(const uint8_t* g, int64_t j) {
  if constexpr (HALF) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16 * j)));
  else return _mm256_loadu_ps(reinterpret_cast<const float*>(g) + 8 * j);
}
#endif

// The fp16 grid values (kernels.h, Int4Dense's half grid) of blocks [b0, b0 + count), count ≤ 16,
// widened exactly to float into out[0, 16) by the F16C / AVX-512 conversion — once per 16 blocks of a
// row, so the block loop reads floats as it does from a float grid. With `overread` the 16 values are
// read whatever count is (lanes past count unused): an interleaved row's grid is followed by more of
// the row, and the buffer by 64 bytes of padding (engines/native: _interleave_rows); else a partial
// chunk is copied first (separate arrays may end right after it).
inline const uint16_t* sixteen_halves(const float* row, int64_t b0, int64_t count, bool overread, uint16_t* tail) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(row) + b0;
  if (overread || count == 16) return h;
  for (int64_t i = 0; i < 16; ++i) tail[i] = i < count ? h[i] : 0;
  return tail;
}
#if defined(__AVX512F__)
inline void widen_halves(const float* row, int64_t b0, int64_t count, bool overread, float* out) {
  alignas(32) uint16_t tail[16];
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sixteen_halves(row, b0, count, overread, tail)));
  _mm512_storeu_ps(out, _mm512_cvtph_ps(v));
}
#elif defined(__F16C__)
inline void widen_halves(const float* row, int64_t b0, int64_t count, bool overread, float* out) {
  alignas(32) uint16_t tail[16];
  const uint16_t* src = sixteen_halves(row, b0, count, overread, tail);
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8))));
}
#endif

#if defined(__AVX512F__) || defined(__F16C__)
// The grid of an Int4Dense kernel's RB rows (row pointers sc, of: Int4Rows) for blocks [b0, b0 + bn),
// bn ≤ 16: S[r][j] and O[r][j] are block b0 + j's scale and offset — a float grid read in place, a half
// grid widened once per chunk of 16 blocks.
template <bool HALF, int RB>
struct GridChunk {
  alignas(64) float hs[HALF ? RB : 1][16];
  alignas(64) float ho[HALF ? RB : 1][16];
  const float* S[RB];
  const float* O[RB];
  GridChunk(const Int4Dense& w, const float* const* sc, const float* const* of, int64_t b0, int64_t bn) {
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if constexpr (HALF) {
        widen_halves(sc[r], b0, bn, w.stride != 0, hs[r]);
        widen_halves(of[r], b0, bn, w.stride != 0, ho[r]);
        S[r] = hs[r], O[r] = ho[r];
      } else {
        S[r] = sc[r] + b0, O[r] = of[r] + b0;
      }
    }
  }
  GridChunk(const GridChunk&) = delete;  // S and O may point into it
  GridChunk& operator=(const GridChunk&) = delete;
};
#endif

// Runs rows(mm, m) over M rows of x in chunks of four: mm is std::integral_constant<int, 4> for the
// full chunks, then 3, 2 or 1 for the rest (a kernel keeps one accumulator per row of x).
template <class Rows>
inline void by_chunks_of_four(int64_t M, Rows rows) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: rows(std::integral_constant<int, 3>{}, m); break;
    case 2: rows(std::integral_constant<int, 2>{}, m); break;
    case 1: rows(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Calls f(dense, int8) with std::true_type / std::false_type for a weight's storage, so a kernel
// instantiates its block template once per kind of row (dense or masked, float or int8 values).
template <class F>
inline void by_storage(bool is_dense, bool is_int8, F f) {
  using T = std::true_type;
  using N = std::false_type;
  if (is_dense) is_int8 ? f(T{}, T{}) : f(T{}, N{});
  else is_int8 ? f(N{}, T{}) : f(N{}, N{});
}

}  // namespace
}  // namespace pk
