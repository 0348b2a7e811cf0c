// 2:4 with 4-bit values (kernels.h, TwoFourInt4), AVX2 + FMA: as twofour_avx2.cpp (16-input halves of
// 8 kept values, their x picked by two permutations and a blend), with a 32-input window's 8 code
// bytes broadcast as one qword and each value's nibble shifted down in its lane (first half: values
// 0-7, second: 8-15), each (code − zero) · scale rounded once. Same values and order as the float32 2:4 kernel: its
// result bit for bit.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // blocks of rows ahead for the next rows' codes (as twofour_int4_avx512.cpp)

template <int MM, int RB>
void block(const TwoFourInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, windows = K / 32;
  const int shift = __builtin_ctzll(uint64_t(w.block));
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3), seven = _mm256_set1_epi32(7), low = _mm256_set1_epi32(15);
  const __m256i nib0 = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12), nib1 = _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28);
  const uint8_t* q[RB];
  const uint8_t* p[RB];
  const float* sc[RB];
  const uint8_t* zp[RB];
  const uint8_t* next_q[RB];
  __m256 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = row_codes(w, n + r);
    p[r] = row_positions(w, n + r);
    sc[r] = row_scales(w, n + r);
    zp[r] = row_zeros(w, n + r);
    const int64_t nn = n + kAhead * RB + r < w.N ? n + kAhead * RB + r : n + r;
    next_q[r] = row_codes(w, nn);
    _mm_prefetch(reinterpret_cast<const char*>(row_positions(w, nn)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row_scales(w, nn)), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  for (int64_t win = 0; win < windows; ++win) {
    const int64_t g = (win * 32) >> shift;
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if (prefetch_codes_at(w, win)) _mm_prefetch(reinterpret_cast<const char*>(next_q[r] + code_offset(w, win)), _MM_HINT_T0);
      uint32_t bits;
      std::memcpy(&bits, p[r] + position_offset(w, win), 4);
      int64_t qv;  // kept value j at nibble 8·(j & 1) + (j >> 1) of the window's qword (kernels.h)
      std::memcpy(&qv, q[r] + code_offset(w, win), 8);
      const __m256i codes = _mm256_set1_epi64x(qv);
      const __m256 s = _mm256_set1_ps(sc[r][g]), z = _mm256_set1_ps(float(zp[r][g]));
      const __m256 wv[2] = {_mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(codes, nib0), low)), z), s),
                            _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(codes, nib1), low)), z), s)};
      PK_UNROLL
      for (int h = 0; h < 2; ++h) {
        const __m256i idx = _mm256_add_epi32(base, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(bits >> (16 * h))), shifts), three));
        const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
        PK_UNROLL
        for (int m = 0; m < MM; ++m) {
          const float* xm = x + m * ldx + win * 32 + 16 * h;
          const __m256 x0 = _mm256_loadu_ps(xm), x1 = _mm256_loadu_ps(xm + 8);
          const __m256 xs = _mm256_blendv_ps(_mm256_permutevar8x32_ps(x0, idx), _mm256_permutevar8x32_ps(x1, idx), hi);
          acc[r][m] = _mm256_fmadd_ps(wv[h], xs, acc[r][m]);
        }
      }
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

void gemv_twofour_int4_avx2(const TwoFourInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

}  // namespace pk
