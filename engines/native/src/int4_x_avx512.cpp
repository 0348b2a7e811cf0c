// Activation-sparse GEMV with input-major 4-bit weights, AVX-512F (pk::Int4InputMajor, kernels.h).
// A task owns a run of active blocks of 32 inputs and every output. For each block it
// sweeps the outputs in tiles of up to 128 outputs (one 64-byte line of each active input's row), the
// tile's 8 accumulators in registers while the block's active rows stream through them, then folds
// them into out with the block's scales and offsets (which follow its rows in the buffer). Each
// active row's line two tiles ahead is prefetched. Chosen over reading whole rows eight at a time
// into an L1 accumulator, over tiles of 256 outputs, and over splitting the outputs (not the blocks)
// between threads, by ad-hoc timing during development (not kept; docs/native.md).
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

template <int C, bool HALF>  // 32-output chunks in this tile (1..4); the grid's form
inline void tile(const Int4InputMajor& w, const ActiveInputs& a, int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o,
                 __m512 xs, float* out) {
  const __m512i low = _mm512_set1_epi32(15);
  __m512 acc[2 * C];
  for (int j = 0; j < 2 * C; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* r = input_codes(w, a.idx[p], at);
    _mm_prefetch(reinterpret_cast<const char*>(r + kInt4xAhead), _MM_HINT_T0);
    const __m512 xv = _mm512_set1_ps(a.vals[p]);
    for (int q = 0; q < C; ++q) {
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16 * q)));
      acc[2 * q] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_and_si512(d, low)), acc[2 * q]);
      acc[2 * q + 1] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4)), acc[2 * q + 1]);
    }
  }
  for (int j = 0; j < 2 * C; ++j) fold16<HALF>(w.zero_point, s, o, j, acc[j], xs, out);
}

}  // namespace

void gemv_int4_x_avx512(const Int4InputMajor& w, const ActiveInputs& a, float* out) {
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for_each_block_tile(w, a, 4, out, [&](int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float sum, int64_t chunks, float* y) {
      const __m512 xs = _mm512_set1_ps(sum);
      switch (chunks) {
        case 4: tile<4, H>(w, a, p0, p1, at, s, o, xs, y); break;
        case 3: tile<3, H>(w, a, p0, p1, at, s, o, xs, y); break;
        case 2: tile<2, H>(w, a, p0, p1, at, s, o, xs, y); break;
        default: tile<1, H>(w, a, p0, p1, at, s, o, xs, y); break;
      }
    });
  });
}

void decompress_int4_x_avx512(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const __m512i low = _mm512_set1_epi32(15);
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for_each_decompress_chunk(w, k0, k1, n0, n1, out, ldo, [&](const uint8_t* r, const uint8_t* s, const uint8_t* o, float* dst) {
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
      const __m512i v[2] = {_mm512_and_si512(d, low), _mm512_srli_epi32(d, 4)};
      for (int h = 0; h < 2; ++h) {
        const __m512 sv = grid16<H>(s, h), ov = grid16<H>(o, h);
        _mm512_storeu_ps(dst + 16 * h, w.zero_point ? int4_weights<true>(v[h], sv, ov) : int4_weights<false>(v[h], sv, ov));
      }
    });
  });
}

}  // namespace pk
