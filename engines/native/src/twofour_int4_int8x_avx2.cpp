// 2:4 with 4-bit values × int8 activations, AVX2 (pk::TwoFourInt4 with `nibbles`, kernels.h). The float
// kernel (twofour_int4_avx2.cpp) spends two permutations, a blend, a conversion and an FMA on every 8
// kept values of a row; the dense 4-bit kernel with int8 activations (int4_int8x_avx2.cpp) multiplies 32
// weights by one `vpmaddubsw`. Here x is quantized as that kernel quantizes it (per block of 32 inputs,
// quantize_x_int4_avx2: the same int8 values, in input order), and one 32-input window of a pair of rows
// is one 32-byte load of the nibble layout: byte = code | index << 4, the index the kept value's input
// within its 16-input half, so the half's x bytes are one `vpshufb` table and the load's high nibbles
// its control (no position decoding at run time: the host builds the layout at load, 4 bits a weight,
// each pair of rows one sequential stream with its scales and zero points in front).
// Per window and row pair: `vpshufb` gathers the 32 kept inputs, `vpmaddubsw` (codes × x, pairs summed:
// at most 2 · 15 · 127) and `vpmaddubsw` by ones (Σ x of the pairs) give Σ (code − zero) · x in 16 bits
// (mullo by the zero points, at most 7620 in magnitude), `vpmaddwd` by ones makes 8 int32 lanes (rows
// A A B B | A A B B), converted and accumulated times the window's x scale; at the end of a grid block
// the sums are multiplied by the rows' scales. Not exact: the activations are rounded to int8 per block
// of 32, as the dense kernel with int8 activations and ONNX Runtime's MatMulNBits at accuracy_level 4 do.
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

constexpr int64_t kAhead = 4;  // row pairs ahead whose windows are prefetched (not tuned by measurement)

// Rows n .. n + 2·PB − 1 (n even; an odd N's padding row, all zeros, is computed and not stored).
template <int MM, int PB>
void block(const TwoFourInt4& w, const Int4X& xq, float* y, int64_t ldy, int64_t n) {
  const int64_t windows = w.K / 32, nbx = w.K / kInt4Block, wpb = w.block / 32, nb = grid_blocks(w), ld = xq.ld;
  const int64_t head = nibble_head(nb), stride = head + w.K;
  const int64_t ahead = kAhead * PB * stride;  // bytes to the same place of the pair kAhead · PB on (prefetch never faults past the end)
  const __m256i nib = _mm256_set1_epi8(15), ones16 = _mm256_set1_epi16(1);
  const uint8_t* vp[PB];
  const float* sc[PB];    // the pair's scales, [block][row]
  const uint16_t* zp[PB];  // its zero points, a byte per row
  __m256 acc[PB][MM];
  PK_UNROLL
  for (int p = 0; p < PB; ++p) {
    const uint8_t* base = w.nibbles + (n / 2 + p) * stride;
    sc[p] = reinterpret_cast<const float*>(base);
    zp[p] = reinterpret_cast<const uint16_t*>(base + 8 * nb);
    vp[p] = base + head;
    for (int64_t at = 0; at < head; at += 64) _mm_prefetch(reinterpret_cast<const char*>(base + ahead + at), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[p][m] = _mm256_setzero_ps();
  }
  const int8_t* xp = xq.bytes;
  const float* sxp = xq.scales;
  const __m256i flip = _mm256_set1_epi8(char(0x80)), zero = _mm256_setzero_si256();
  for (int64_t g = 0; g < nb; ++g) {
    __m256i zv[PB], z8[PB];
    __m256 part[PB][MM];
    PK_UNROLL
    for (int p = 0; p < PB; ++p) {
      const int za = zp[p][g] & 255, zb = zp[p][g] >> 8;
      zv[p] = _mm256_blend_epi32(_mm256_set1_epi8(char(za)), _mm256_set1_epi8(char(zb)), 0xCC);  // bytes of the pair's values: A×8 B×8 per half
      z8[p] = _mm256_setr_epi32(8 * za, 0, 8 * zb, 0, 8 * za, 0, 8 * zb, 0);  // lanes 0, 2 / 4, 6: a row's 8 values' zero points
      PK_UNROLL
      for (int m = 0; m < MM; ++m) part[p][m] = _mm256_setzero_ps();
    }
    const int64_t wn = windows - g * wpb < wpb ? windows - g * wpb : wpb;
    for (int64_t i = 0; i < wn; ++i, xp += 32, ++sxp) {
      __m256i xv[MM];
      __m256 sx[MM];
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        xv[m] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + m * ld)), flip);  // x + 128, unsigned
        sx[m] = _mm256_broadcast_ss(sxp + m * nbx);
      }
      PK_UNROLL
      for (int p = 0; p < PB; ++p) {
        _mm_prefetch(reinterpret_cast<const char*>(vp[p] + ahead), _MM_HINT_T0);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp[p]));
        vp[p] += 32;
        const __m256i codes = _mm256_and_si256(b, nib), idx = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        const __m256i wv = _mm256_sub_epi8(codes, zv[p]);  // code − zero: −15 .. 15
        // Σ (x + 128)(c − z) − 128 Σ (c − z) = Σ x (c − z), by lanes A A B B | A A B B, exactly: the codes' sums
        // (vpsadbw: a row's 8 in a qword's low dword) fall on lanes 0, 2 / 4, 6, each row's own, less its 8 z
        const __m256i csum = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_sad_epu8(codes, zero), z8[p]), 7);
        PK_UNROLL
        for (int m = 0; m < MM; ++m) {
          const __m256i xg = _mm256_shuffle_epi8(xv[m], idx);
          const __m256i t = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(xg, wv), ones16), csum);
          part[p][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sx[m], part[p][m]);
        }
      }
    }
    PK_UNROLL
    for (int p = 0; p < PB; ++p) {
      // lanes of the pair's int32 sums: rows A A B B | A A B B
      const __m256 sv = _mm256_blend_ps(_mm256_broadcast_ss(sc[p] + 2 * g), _mm256_broadcast_ss(sc[p] + 2 * g + 1), 0xCC);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) acc[p][m] = _mm256_fmadd_ps(part[p][m], sv, acc[p][m]);
    }
  }
  PK_UNROLL
  for (int p = 0; p < PB; ++p)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      // lanes 0, 1, 4, 5 row A; 2, 3, 6, 7 row B
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[p][m]), _mm256_extractf128_ps(acc[p][m], 1));  // A A B B
      const __m128 s = _mm_add_ps(h, _mm_shuffle_ps(h, h, _MM_SHUFFLE(2, 3, 0, 1)));                          // A+A A+A B+B B+B
      const int64_t row = n + 2 * p;
      y[m * ldy + row] = _mm_cvtss_f32(s);
      if (row + 1 < w.N) y[m * ldy + row + 1] = _mm_cvtss_f32(_mm_movehl_ps(s, s));
    }
}

template <int MM>
void rows(const TwoFourInt4& w, const Int4X& xq, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int PB = MM == 1 ? 2 : 1;  // accumulators: 2 · PB · MM registers
  int64_t n = n0;
  for (; n + 2 * PB <= n1; n += 2 * PB) block<MM, PB>(w, xq, y, ldy, n);
  for (; n < n1; n += 2) block<MM, 1>(w, xq, y, ldy, n);
}

}  // namespace

void gemv_twofour_int4_int8x_avx2(const TwoFourInt4& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nbx = w.K / kInt4Block;
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const Int4X part{xq.bytes + m * xq.ld, xq.scales + m * nbx, xq.sums + m * nbx, xq.ld};
    rows<decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
  });
}

}  // namespace pk
