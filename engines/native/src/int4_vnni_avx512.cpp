// 4-bit dense weights × int8 activations, AVX-512 VNNI (compiled with -mavx512f -mavx512bw
// -mavx512vnni): the int4 format (kernels.h, Int4Dense) with the engine's int8_activations option.
// Each row of x is quantized per block of 32 inputs, symmetric (sx = max|x| / 127, qx in [-127, 127]),
// and laid out per 128 inputs (four blocks) as two 64-byte vectors that match the codes' nibbles: the
// low one [b0 x0-15 | b1 x0-15 | b2 x0-15 | b3 x0-15], the high one the same for x16-31 (K % 128 == 64:
// the last two blocks as one vector [b0 x0-15 | b1 x0-15 | b0 x16-31 | b1 x16-31], their 32 code bytes
// split into [low nibbles | high nibbles] to match). A row's 64
// code bytes of those four blocks then give the weights' codes by one AND (low nibbles) and one
// shift + AND (high ones), and two `vpdpbusd` (unsigned codes × signed activations, four products per
// 32-bit lane) put each block's Σ code·qx into its four lanes. Per lane: × scale_b · sx_b; the offsets
// come in as Σ_b offset_b · Σx_b with the blocks' float sums of x. Not exact: the activations are
// rounded to int8, as ONNX Runtime's MatMulNBits does at accuracy_level 4.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// Two floats as lanes 0-3, 8-11 (the first) and 4-7, 12-15 (the second): the tail pair's blocks.
inline __m512 spread2(const float* p) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))));
}

// Lane i of four floats spread to lanes 4i..4i+3.
inline __m512 spread4(const float* p) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(p)));
}

constexpr int64_t kAhead = 8;  // as int4_avx512.cpp (not tuned by measurement)

template <int MM, int RB>
void block(const Int4Dense& w, const Int4X& xq, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, nb = K / kInt4Block, quads = K / 128;
  const Int4Rows<RB> rows(w, n, kAhead);
  const auto &q = rows.q, &sc = rows.sc, &of = rows.of, &next = rows.next;
  __m512 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  const __m512i nib = _mm512_set1_epi8(15);
  for (int64_t j = 0; j < quads; ++j) {
    __m512i xlo[MM], xhi[MM];
    __m512 sx[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      xlo[m] = _mm512_loadu_si512(xq.bytes + m * xq.ld + j * 128);
      xhi[m] = _mm512_loadu_si512(xq.bytes + m * xq.ld + j * 128 + 64);
      sx[m] = spread4(xq.scales + m * nb + 4 * j);
    }
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch(next[r] + j * 64, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(q[r] + j * 64);
      const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      const __m512 s = spread4(sc[r] + 4 * j);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]), hi, xhi[m]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, sx[m]), acc[r][m]);
      }
    }
  }
  if (K % 128) {  // the last two blocks: 32 code bytes → [low nibbles | high nibbles]
    const int64_t t = quads * 128;
    __m512i xt[MM];
    __m512 sxt[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      xt[m] = _mm512_loadu_si512(xq.bytes + m * xq.ld + t);
      sxt[m] = spread2(xq.scales + m * nb + 4 * quads);
    }
    const __m256i nib8 = _mm256_set1_epi8(15);
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + t / 2));
      const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, nib8)), _mm256_and_si256(_mm256_srli_epi16(v, 4), nib8), 1);
      const __m512 s = spread2(sc[r] + 4 * quads);
      PK_UNROLL
      for (int m = 0; m < MM; ++m)
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xt[m])), _mm512_mul_ps(s, sxt[m]), acc[r][m]);
    }
  }
  // the offsets' share Σ_b offset_b · Σx_b, 16 blocks per FMA
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 lanes = nb - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nb - b)) - 1u);
      __m512 o = _mm512_maskz_loadu_ps(lanes, of[r] + b);
      if (w.zero_point) o = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(o, _mm512_maskz_loadu_ps(lanes, sc[r] + b)));  // −zero · scale
      PK_UNROLL
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(lanes, xq.sums + m * nb + b), acc[r][m]);
    }
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
  }
}

template <int MM>
void rows(const Int4Dense& w, const Int4X& xq, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<MM, 4>(w, xq, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1>(w, xq, y, ldy, n);
}

}  // namespace

void quantize_x_int4_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* bytes, float* scales, float* sums) {
  const int64_t nb = K / kInt4Block;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * ldx + b * 32;
      const __m512 a = _mm512_loadu_ps(v), c = _mm512_loadu_ps(v + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const __m512 inv = _mm512_set1_ps(1.f / s);
      const __m512i lim = _mm512_set1_epi32(127), neg = _mm512_set1_epi32(-127);
      const __m512i qa = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), neg), lim);
      const __m512i qc = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(c, inv)), neg), lim);
      // block b of its quad: inputs 0-15 at byte 16·(b%4) of the quad's low vector, 16-31 of its high
      // one; in a last pair of blocks (K % 128 == 64) the high halves follow the two low ones
      int8_t* quad = bytes + m * K + (b / 4) * 128 + (b % 4) * 16;
      const int64_t high = (b / 4) * 128 + 128 <= K ? 64 : 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(quad), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(quad + high), _mm512_cvtepi32_epi8(qc));
      scales[m * nb + b] = s;
      sums[m * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
    }
  }
}

void gemv_int4x_avx512(const Int4Dense& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const int64_t nb = w.K / kInt4Block;
    const Int4X part{xq.bytes + m * xq.ld, xq.scales + m * nb, xq.sums + m * nb, xq.ld};
    rows<decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
  });
}

}  // namespace pk
