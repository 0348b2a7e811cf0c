// Dense int8 weights × int8 activations, AVX-512 VNNI (compiled with -mavx512f -mavx512bw
// -mavx512vnni): the accuracy_level 4 path (the quantize pass's option, ONNX Runtime's MatMulNBits
// semantics). Each row of x is quantized per block of 32 inputs, symmetric: sx = max|x| / 127,
// qx = round(x / sx) in [-127, 127], stored as the unsigned byte qx + 128 so `vpdpbusd` (unsigned ×
// signed bytes, four products per 32-bit lane) multiplies 64 weights per instruction. The offset
// comes back out per block: Σ w·(qx + 128) = Σ w·qx + 128·Σ w, and 128·Σ w·sw is precomputed per
// row and block (`corr`). A 64-byte chunk of a row is two blocks: lanes 0-7 the first, 8-15 the
// second; its partial sums are converted to floats and scaled per lane by sw·sx of their block.
// Also the same weights × 16-bit activations (gemv_int8_x16_avx512, the default where the CPU has VNNI:
// the int8 LM head of a Q8_0 embedding and dense INT8 linears): x as in the 16-bit 4-bit kernels (xq +
// 32768 = 256 · xh + xl per input, one scale per row of x; not bit-exact, each input rounded to 1/32639
// of the row's largest |x|), two `vpdpbusd` per 64 weights (xh and xl against the codes), per chunk
// 256 · h + l converted to floats and scaled per lane by its block's scale, and the offset taken back out
// once per row: y = sx · (Σ − 32768 · Σ_k W[n][k]) with the row's sum of its values (row_sums) computed
// when the weight is loaded. The float kernel (avx512.cpp) spends a widening, a conversion and an FMA
// on every 16 codes, and on one core reads a Q8_0 LM head below the core's read bandwidth.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// Lanes 0-7 take element 0 of a pair, lanes 8-15 element 1.
inline __m512 pair_lanes(const float* p) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))));
}

// Rows n .. n + RB − 1's codes and block scales, and the rows 4 · RB ahead, fetched a line per 64-code
// chunk while this block computes (as avx512.cpp's int8 rows; fetching each whole row at a block's start
// was slower streamed: kernel_throughput's dense-int8 kind, 6.51 against 5.51 ms a step).
// Also the block's MM × RB float accumulators, zeroed.
template <int MM, int RB>
struct RowBlock {
  const int8_t* q[RB];
  const float* sw[RB];
  const char* next[RB];
  __m512 acc[RB][MM];
  RowBlock(const Bitmask& w, int64_t n) {
    const int64_t K = w.K, nb = K / 32;
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      q[r] = w.q.values + (n + r) * K;
      sw[r] = w.q.scales + (n + r) * nb;
      const int64_t nn = n + 4 * RB + r < w.N ? n + 4 * RB + r : n + r;
      next[r] = reinterpret_cast<const char*>(w.q.values + nn * K);
      _mm_prefetch(reinterpret_cast<const char*>(w.q.scales + nn * nb), _MM_HINT_T0);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
    }
  }
  void prefetch(int64_t j) const {
    PK_UNROLL
    for (int r = 0; r < RB; ++r) _mm_prefetch(next[r] + 64 * j, _MM_HINT_T0);
  }
};

// Rows n .. n + RB − 1 × MM rows of x: int8 activations (X = QuantizedX: one `vpdpbusd` per chunk, each
// lane's sum scaled by its block's weight and activation scales, the +128 offset taken out per block at
// the end) or 16-bit ones (X = X16: two, 256 · h + l scaled by the weight's block scale, the offset taken
// out per row at the end: see the top).
template <int MM, int RB, class X>
void block(const Bitmask& w, const X& x, float* y, int64_t ldy, int64_t n) {
  constexpr bool k16 = std::is_same_v<X, X16>;
  const int64_t K = w.K, chunks = K / 64, nb = K / 32;
  RowBlock<MM, RB> rb(w, n);
  __m512(&acc)[RB][MM] = rb.acc;
  for (int64_t j = 0; j < chunks; ++j) {
    rb.prefetch(j);
    __m512i xa[MM], xb[MM];  // int8: the codes (xb unused); 16-bit: the high and low bytes
    __m512 sx[MM];           // int8: the activations' block scales
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      if constexpr (k16) {
        xa[m] = _mm512_loadu_si512(x.hi + m * x.ld + j * 64);
        xb[m] = _mm512_loadu_si512(x.lo + m * x.ld + j * 64);
      } else {
        xa[m] = _mm512_loadu_si512(x.u8 + m * x.ld + j * 64);
        sx[m] = pair_lanes(x.scales + m * nb + 2 * j);
      }
    }
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      const __m512i wv = _mm512_loadu_si512(rb.q[r] + j * 64);
      const __m512 s = pair_lanes(rb.sw[r] + 2 * j);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        const __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xa[m], wv);
        if constexpr (k16)
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h, 8), _mm512_dpbusd_epi32(_mm512_setzero_si512(), xb[m], wv))), s,
                                      acc[r][m]);
        else
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_mul_ps(s, sx[m]), acc[r][m]);
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    if constexpr (k16) {
      PK_UNROLL
      for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = x.scale[m] * (hsum(acc[r][m]) - 32768.f * w.q.row_sums[n + r]);
    } else {
      // the offset's share, Σ_b 128·Σw_b·sw_b · sx_b, taken out of every lane's sum: 16 blocks per FMA (a
      // scalar loop over the blocks was a dependency chain as long as the row's arithmetic)
      const float* corr = w.q.corr + (n + r) * nb;
      for (int64_t b = 0; b < nb; b += 16) {
        const __mmask16 lanes = nb - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nb - b)) - 1u);
        const __m512 c = _mm512_maskz_loadu_ps(lanes, corr + b);
        PK_UNROLL
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_fnmadd_ps(c, _mm512_maskz_loadu_ps(lanes, x.scales + m * nb + b), acc[r][m]);
      }
      PK_UNROLL
      for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
    }
  }
}

// Rows [n0, n1), four at a time.
template <int MM, class X>
void rows(const Bitmask& w, const X& x, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<MM, 4, X>(w, x, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1, X>(w, x, y, ldy, n);
}

}  // namespace

void gemv_int8_x16_avx512(const Bitmask& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const X16 part{x.hi + m * x.ld, x.lo + m * x.ld, x.scale + m, x.ld};
    rows<decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
  });
}

void quantize_x_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, uint8_t* u8, float* scales) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * ldx + b * 32;
      const __m512 a = _mm512_loadu_ps(v), c = _mm512_loadu_ps(v + 16);
      const __m512 mx = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c));
      const float amax = _mm512_reduce_max_ps(mx);
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const __m512 inv = _mm512_set1_ps(1.f / s);
      // round to nearest even, clamp to ±127, + 128 → unsigned bytes
      const __m512i qa = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), _mm512_set1_epi32(128));
      const __m512i qc = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(c, inv)), _mm512_set1_epi32(128));
      const __m512i lo = _mm512_set1_epi32(1), hi = _mm512_set1_epi32(255);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u8 + m * K + b * 32), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(qa, lo), hi)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(u8 + m * K + b * 32 + 16), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(qc, lo), hi)));
      scales[m * nb + b] = s;
    }
  }
}

void gemv_int8x_avx512(const Bitmask& w, const QuantizedX& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const QuantizedX part{xq.u8 + m * xq.ld, xq.scales + m * (w.K / 32), xq.ld};
    rows<decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
  });
}

}  // namespace pk
