// 4-bit dense weights × int8 activations, AVX2 + FMA + F16C: the int4 format (kernels.h, Int4Dense)
// with the engine's int8_activations option where the instruction set is AVX2 (the AVX-512 one is
// int4_vnni_avx512.cpp). Each row of x is quantized per block of 32 inputs as that kernel does
// (sx = max|x| / 127, qx = round(x / sx) in [-127, 127], the same values) but kept in input order
// (quantize_x_blocks_avx2, B = 32). A block's 16 code bytes give its 32 codes in input order as one vector
// [low nibbles | high nibbles]; `vpmaddubsw` (unsigned codes × signed activations, adjacent pairs
// summed to 16 bits: at most 2 · 15 · 127, no saturation) and `vpmaddwd` by ones leave 8 partial sums
// of Σ code·qx, converted and multiplied by scale_b · sx_b into the row's accumulator: two integer
// multiplies per 32 weights where the fp32-activation kernel (int4_avx2.cpp) converts and multiplies
// each weight. The offsets come in as Σ_b offset_b · Σx_b with the blocks' float sums of x. Not exact:
// the activations are rounded to int8, as ONNX Runtime's MatMulNBits does at accuracy_level 4.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 8;  // as int4_avx512.cpp (not tuned by measurement)

template <bool ZP, bool HALF, int MM, int RB>
void block(const Int4Dense& w, const Int4X& xq, float* y, int64_t ldy, int64_t n) {
  const int64_t nb = w.K / kInt4Block;
  const Int4Rows<RB> rows(w, n, kAhead);
  const auto &q = rows.q, &next = rows.next;
  __m256 acc[RB][MM];
  float off[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps(), off[r][m] = 0.f;
  }
  const __m128i nib = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t bn = nb - b0 < 16 ? nb - b0 : 16;
    const GridChunk<HALF, RB> g(w, rows.sc, rows.of, b0, bn);
    for (int64_t b = b0; b < b0 + bn; ++b) {
      __m256i xv[MM];
      __m256 sx[MM];
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.bytes + m * xq.ld + b * 32));
        sx[m] = _mm256_set1_ps(xq.scales[m * nb + b]);
      }
      PK_UNROLL
      for (int r = 0; r < RB; ++r) {
        if ((b & 3) == 0) _mm_prefetch(next[r] + b * 16, _MM_HINT_T0);  // 4 blocks = one 64-byte line
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + b * 16));
        const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
        const float s = g.S[r][b - b0];
        const float o = ZP ? -g.O[r][b - b0] * s : g.O[r][b - b0];  // the zero-point form: −zero · scale
        const __m256 sv = _mm256_set1_ps(s);
        PK_UNROLL
        for (int m = 0; m < MM; ++m) {
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv[m]), ones);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sv, sx[m]), acc[r][m]);
          off[r][m] += o * xq.sums[m * nb + b];
        }
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]) + off[r][m];
}

template <bool ZP, bool HALF, int MM>
void rows(const Int4Dense& w, const Int4X& xq, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<ZP, HALF, MM, 4>(w, xq, y, ldy, n);
  for (; n < n1; ++n) block<ZP, HALF, MM, 1>(w, xq, y, ldy, n);
}

}  // namespace

void quantize_x_blocks_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, int64_t B, bool offset, int8_t* bytes, float* scales, float* sums) {
  const int64_t nb = (K + B - 1) / B;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lim = _mm256_set1_epi32(127), neg = _mm256_set1_epi32(-127), flip = _mm256_set1_epi8(char(offset ? 0x80 : 0));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs work per 128-bit lane: back to input order
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * ldx + b * B;
      const int64_t len = K - b * B < B ? K - b * B : B;  // a multiple of 32
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = 0; k < len; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)));
      const float amax = hmax(mx);
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const __m256 inv = _mm256_set1_ps(1.f / s);
      float total = 0.f;
      for (int64_t k = 0; k < len; k += 32) {
        __m256 a[4];
        __m256i qi[4];
        PK_UNROLL
        for (int i = 0; i < 4; ++i) {
          a[i] = _mm256_loadu_ps(v + k + 8 * i);
          qi[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a[i], inv)), neg), lim);
        }
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(bytes + m * K + b * B + k), _mm256_xor_si256(_mm256_permutevar8x32_epi32(packed, order), flip));
        total += hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
      }
      scales[m * nb + b] = s;
      sums[m * nb + b] = total;
    }
  }
}

void gemv_int4x_avx2(const Int4Dense& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = w.K / kInt4Block;
  by_int4_grid(w, [&](auto zp, auto half) {
    by_chunks_of_four(M, [&](auto mm, int64_t m) {
      const Int4X part{xq.bytes + m * xq.ld, xq.scales + m * nb, xq.sums + m * nb, xq.ld};
      rows<decltype(zp)::value, decltype(half)::value, decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
    });
  });
}

}  // namespace pk
