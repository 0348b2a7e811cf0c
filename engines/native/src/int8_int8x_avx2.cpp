// Dense int8 weights × int8 activations, AVX2 (pk::Bitmask without masks, int8 values in blocks of 32
// with w.q.corr set: the engine's int8_activations option), the AVX2 counterpart of the VNNI kernel
// (vnni_avx512.cpp, gemv_int8x_avx512). x is quantized as the int4 kernels quantize it
// (quantize_x_blocks_avx2 with B = 32: per block of 32 inputs, sx = max|x| / 127, q = round(x / sx) in [−127, 127],
// signed bytes in input order). `vpmaddubsw` needs one unsigned operand and saturates at 16 bits, so a
// block is |w| (unsigned, at most 128) times q with w's sign (`vpsignb`): pairs summed at most
// 2 · 128 · 127 = 32512; `vpmaddwd` by ones, then converted and multiplied by scale · sx. Not exact: the
// activations are rounded to int8 per block, as the VNNI kernel and ONNX Runtime's accuracy_level 4 do.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // rows ahead whose lines are prefetched (as the other dense kernels; not tuned)

template <int MM, int RB>
void block(const Bitmask& w, const Int4X& xq, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* q[RB];
  const float* sc[RB];
  __m256 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = w.q.values + (n + r) * K;
    sc[r] = w.q.scales + (n + r) * nb;
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  const int64_t ahead = n + kAhead * RB < w.N ? kAhead * RB * K : 0;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MM];
    __m256 sx[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.bytes + m * xq.ld + 32 * b));
      sx[m] = _mm256_broadcast_ss(xq.scales + m * nb + b);
    }
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(q[r] + 32 * b + ahead), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + 32 * b));
      const __m256i mag = _mm256_abs_epi8(wv);
      const __m256 s = _mm256_broadcast_ss(sc[r] + b);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(xv[m], wv)), ones);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, sx[m]), acc[r][m]);
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <int MM>
void rows(const Bitmask& w, const Int4X& xq, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int RB = MM == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) block<MM, RB>(w, xq, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1>(w, xq, y, ldy, n);
}

}  // namespace

void gemv_int8_int8x_avx2(const Bitmask& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = w.K / 32;
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const Int4X part{xq.bytes + m * xq.ld, xq.scales + m * nb, nullptr, xq.ld};
    rows<decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
  });
}

}  // namespace pk
