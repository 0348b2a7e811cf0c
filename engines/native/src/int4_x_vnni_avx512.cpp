// Activation-sparse GEMV with input-major 4-bit weights × 16-bit activations, AVX-512 VNNI (compiled
// with -mavx512f -mavx512bw -mavx512vnni; pk::Int4InputMajor, pk::ActiveQuads in kernels.h).
// The float kernel (int4_x_avx512.cpp) spends 7 vector instructions on every 32 weights of an active
// row (widen, mask, shift, two int→float conversions, two FMAs): more per weight than the row-major
// dense kernel, so skipping 30 % of the inputs bought nothing. Here the active inputs of a block come
// in fours (a quad; the last one padded with zero activations), each rounded to a 16-bit integer
// xq = 256 · xh + xl with xh, xl signed bytes, and a quad's four 64-byte lines (128 outputs) are
// interleaved byte by byte — eight unpacks per nibble half — so that one `vpdpbusd` adds four rows'
// code · xh products per output (and one more the xl ones): 44 instructions per 512 weights. Per
// active block and tile, the integer sums (exact: |Σ| ≤ 32 · 15 · 32639 < 2^24) are put back in output
// order by a 4 × 4 transpose of 128-bit lanes and folded in as the float kernel does: y += scale ·
// (qs · Σ code · xq) + offset · Σ x. Not bit-exact: each input is rounded to 1/32639 of its block's
// largest |x| (relative error ≤ 1.6e-5 of it), where the float kernel rounds only its products.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

// Four rows' code bytes (one nibble half, 0-15 each) → per output n a 32-bit lane [a b c d], the dot
// products with the quad's high and low activation bytes added into h and l. Lane m of 128-bit lane c
// of result i is output 4i + m of the 16 that lane c's chunk holds in this half.
inline void quad(__m512i a, __m512i b, __m512i c, __m512i d, __m512i xh, __m512i xl, __m512i* h, __m512i* l) {
  const __m512i t0 = _mm512_unpacklo_epi8(a, b), t1 = _mm512_unpackhi_epi8(a, b);
  const __m512i t2 = _mm512_unpacklo_epi8(c, d), t3 = _mm512_unpackhi_epi8(c, d);
  const __m512i u[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2), _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
  PK_UNROLL
  for (int i = 0; i < 4; ++i) {
    h[i] = _mm512_dpbusd_epi32(h[i], u[i], xh);
    l[i] = _mm512_dpbusd_epi32(l[i], u[i], xl);
  }
}

template <bool HALF>
inline void tile(const Int4InputMajor& w, const uint8_t* base, const ActiveQuads& a, int64_t q0, int64_t q1, const uint8_t* s, const uint8_t* o,
                 float qs, float sum, int64_t chunks, float* out) {
  const __m512i nib = _mm512_set1_epi8(15);
  __m512i h[8], l[8];  // [0, 4): low nibbles, [4, 8): high nibbles
  PK_UNROLL
  for (int i = 0; i < 8; ++i) h[i] = l[i] = _mm512_setzero_si512();
  for (int64_t q = q0; q < q1; ++q) {
    const int32_t* r = a.rows + 4 * q;
    const uint8_t *ra = base + r[0], *rb = base + r[1], *rc = base + r[2], *rd = base + r[3];
    _mm_prefetch(reinterpret_cast<const char*>(ra + kInt4xAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rb + kInt4xAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rc + kInt4xAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rd + kInt4xAhead), _MM_HINT_T0);
    const __m512i va = _mm512_loadu_si512(ra), vb = _mm512_loadu_si512(rb), vc = _mm512_loadu_si512(rc), vd = _mm512_loadu_si512(rd);
    const __m512i xh = _mm512_set1_epi32(a.xh[q]), xl = _mm512_set1_epi32(a.xl[q]);
    quad(_mm512_and_si512(va, nib), _mm512_and_si512(vb, nib), _mm512_and_si512(vc, nib), _mm512_and_si512(vd, nib), xh, xl, h, l);
    quad(_mm512_and_si512(_mm512_srli_epi16(va, 4), nib), _mm512_and_si512(_mm512_srli_epi16(vb, 4), nib), _mm512_and_si512(_mm512_srli_epi16(vc, 4), nib),
         _mm512_and_si512(_mm512_srli_epi16(vd, 4), nib), xh, xl, h + 4, l + 4);
  }
  const __m512 qv = _mm512_set1_ps(qs), xs = _mm512_set1_ps(sum);
  PK_UNROLL
  for (int half = 0; half < 2; ++half) {  // outputs 32c + 0..15 of each chunk c, then 32c + 16..31
    __m512i v[4];
    PK_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = _mm512_add_epi32(_mm512_slli_epi32(h[4 * half + i], 8), l[4 * half + i]);
    // 4 × 4 transpose of 128-bit lanes: z[c] = lane c of v[0], v[1], v[2], v[3] = chunk c's 16 outputs in order
    const __m512i A = _mm512_shuffle_i32x4(v[0], v[1], 0x44), B = _mm512_shuffle_i32x4(v[0], v[1], 0xEE);
    const __m512i C = _mm512_shuffle_i32x4(v[2], v[3], 0x44), D = _mm512_shuffle_i32x4(v[2], v[3], 0xEE);
    const __m512i z[4] = {_mm512_shuffle_i32x4(A, C, 0x88), _mm512_shuffle_i32x4(A, C, 0xDD), _mm512_shuffle_i32x4(B, D, 0x88),
                          _mm512_shuffle_i32x4(B, D, 0xDD)};
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j = 2 * c + half;
      fold16<HALF>(w.zero_point, s, o, j, _mm512_mul_ps(qv, _mm512_cvtepi32_ps(z[c])), xs, out);
    }
  }
}

}  // namespace

void gemv_int4_x_i16_avx512(const Int4InputMajor& w, const ActiveQuads& a, float* out) {
  const int64_t chunks = (w.N + 31) / 32, vb = w.half ? 2 : 4;
  for (int64_t j = 0; j < 32 * chunks; ++j) out[j] = 0.f;
  by_input_major_grid(w, [&](auto half) {
    constexpr bool H = decltype(half)::value;
    for (int64_t t = 0; t < a.nblocks; ++t) {
      const int64_t b = a.blocks[t];
      const uint8_t* s = block_scales(w, b);
      const uint8_t* o = block_offsets(w, b);
      for (int64_t c = 0; c < chunks; c += 4)  // a tile: 128 outputs, one 64-byte line of each row
        tile<H>(w, input_codes(w, 32 * b, 16 * c), a, a.starts[t], a.starts[t + 1], s + 32 * c * vb, o + 32 * c * vb, a.qs[t], a.sums[t],
                chunks - c < 4 ? chunks - c : 4, out + 32 * c);
    }
  });
}

}  // namespace pk
