// 2:4 with 4-bit values × int8 activations, AVX2 (pk::TwoFourInt4 with `nibbles`, kernels.h). The float
// kernel (twofour_int4_avx2.cpp) spends two permutations, a blend, a conversion and an FMA on every 8
// kept values of a row; the dense 4-bit kernel with int8 activations (int4_int8x_avx2.cpp) converts and
// scales every 32 weights' sums. Here x is quantized per block of the weight's grid (quantize_x_blocks_avx2,
// int4_int8x_avx2.cpp: sx = max|x| / 127 per block, q = round(x / sx) in [−127, 127], stored as q + 128), so a
// block's products stay integers until its end. One 32-input window of a pair of rows is 24 bytes of
// the nibble layout (kernels.h; the host builds it at load, each pair of rows one sequential stream with
// its grid in front): 16 code bytes, broadcast to both 16-input halves and shifted per half, and a qword
// of 2-bit positions, broadcast and shifted per dword so that each lands at the bottom of its value's
// byte; plus the group's offset within the half (a constant) it is the `vpshufb` control that gathers
// the half's x bytes for both rows. Per window and row pair: `vpshufb` gathers the 32
// kept inputs, the codes less their zero points (signed bytes, −15 .. 15) times them by `vpmaddubsw`
// (pairs summed, at most 2 · 255 · 15 in 16 bits) add into 16-bit sums, widened by `vpmaddwd` every four
// windows (at most 30600). At a block's end, Σ (q + 128)(c − z) less the row's 128 · Σ (c − z) (computed
// at load, in the layout's grid) is Σ q (c − z) exactly; converted once, times scale · sx. Not exact: the
// activations are rounded to int8 per block, as ONNX Runtime's MatMulNBits does at accuracy_level 4.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

inline int64_t load_u64(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

constexpr int64_t kAhead = 1;  // row pairs ahead whose windows are prefetched (not tuned: 1, 4 and 16 were within the noise in probes not kept)

// Rows n .. n + 2·PB − 1 (n even; an odd N's padding row is computed and not stored).
template <int MM, int PB>
void block(const TwoFourInt4& w, const Int4X& xq, float* y, int64_t ldy, int64_t n) {
  const int64_t windows = w.K / 32, wpb = w.block / 32, nb = grid_blocks(w), ld = xq.ld;
  const int64_t head = nibble_head(nb), stride = head + kNibbleWindow * windows;
  const int64_t ahead = kAhead * PB * stride;  // bytes to the same place of the pair kAhead · PB on (prefetch never faults past the end)
  const __m256i nib = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3), ones16 = _mm256_set1_epi16(1);
  const __m256i code_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), pos_shift = _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6);
  // each value's group within its half, times 4: byte j of a row's 8 in a half belongs to group j / 2
  const __m256i group = _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  const uint8_t* vp[PB];
  const float* sc[PB];     // the pair's scales, [block][row]
  const int32_t* corr[PB]; // its 128 · Σ (code − zero), [block][row]
  const uint16_t* zp[PB];  // its zero points, a byte per row
  __m256 acc[PB][MM];
  PK_UNROLL
  for (int p = 0; p < PB; ++p) {
    const uint8_t* base = w.nibbles + (n / 2 + p) * stride;
    sc[p] = reinterpret_cast<const float*>(base);
    corr[p] = reinterpret_cast<const int32_t*>(base + 8 * nb);
    zp[p] = reinterpret_cast<const uint16_t*>(base + 16 * nb);
    vp[p] = base + head;
    for (int64_t at = 0; at < head; at += 64) _mm_prefetch(reinterpret_cast<const char*>(base + ahead + at), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[p][m] = _mm256_setzero_ps();
  }
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(xq.bytes);
  for (int64_t g = 0; g < nb; ++g) {
    __m256i zv[PB], s16[PB][MM], s32[PB][MM];
    PK_UNROLL
    for (int p = 0; p < PB; ++p) {
      const uint16_t z = zp[p][g];  // bytes of the pair's values: A×8 B×8 per half
      zv[p] = _mm256_blend_epi32(_mm256_set1_epi8(char(z & 255)), _mm256_set1_epi8(char(z >> 8)), 0xCC);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) s16[p][m] = s32[p][m] = _mm256_setzero_si256();
    }
    const int64_t wn = windows - g * wpb < wpb ? windows - g * wpb : wpb;
    for (int64_t i = 0; i < wn; ++i, xp += 32) {
      __m256i xv[MM];
      PK_UNROLL
      for (int m = 0; m < MM; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + m * ld));
      PK_UNROLL
      for (int p = 0; p < PB; ++p) {
        _mm_prefetch(reinterpret_cast<const char*>(vp[p] + ahead), _MM_HINT_T0);
        // the window's 16 code bytes in both halves, each half's nibbles shifted down; its 8 position
        // bytes in every qword, each value's 2-bit field shifted to the bottom of its byte
        const __m256i cb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp[p])));
        const __m256i pb = _mm256_set1_epi64x(load_u64(vp[p] + 16));
        vp[p] += kNibbleWindow;
        const __m256i wv = _mm256_sub_epi8(_mm256_and_si256(_mm256_srlv_epi32(cb, code_shift), nib), zv[p]);  // code − zero: −15 .. 15
        const __m256i idx = _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(pb, pos_shift), three), group);
        PK_UNROLL
        for (int m = 0; m < MM; ++m) s16[p][m] = _mm256_add_epi16(s16[p][m], _mm256_maddubs_epi16(_mm256_shuffle_epi8(xv[m], idx), wv));
      }
      if ((i & 3) == 3 && i + 1 < wn) {  // four windows' 16-bit sums into 32 bits (a longer block)
        PK_UNROLL
        for (int p = 0; p < PB; ++p)
          PK_UNROLL
          for (int m = 0; m < MM; ++m) s32[p][m] = _mm256_add_epi32(s32[p][m], _mm256_madd_epi16(s16[p][m], ones16)), s16[p][m] = _mm256_setzero_si256();
      }
    }
    PK_UNROLL
    for (int p = 0; p < PB; ++p) {
      // lanes of the pair's int32 sums: rows A A B B | A A B B; each row's correction on its first lane
      const __m256i c = _mm256_zextsi128_si256(_mm_cvtepu32_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(corr[p] + 2 * g))));
      const __m256 sv = _mm256_blend_ps(_mm256_broadcast_ss(sc[p] + 2 * g), _mm256_broadcast_ss(sc[p] + 2 * g + 1), 0xCC);
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        const __m256i t = _mm256_sub_epi32(_mm256_add_epi32(s32[p][m], _mm256_madd_epi16(s16[p][m], ones16)), c);
        acc[p][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(sv, _mm256_broadcast_ss(xq.scales + m * nb + g)), acc[p][m]);
      }
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
  constexpr int PB = MM == 1 ? 2 : 1;  // accumulators: 3 · PB · MM registers
  int64_t n = n0;
  for (; n + 2 * PB <= n1; n += 2 * PB) block<MM, PB>(w, xq, y, ldy, n);
  for (; n < n1; n += 2) block<MM, 1>(w, xq, y, ldy, n);
}

}  // namespace

void gemv_twofour_int4_int8x_avx2(const TwoFourInt4& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = grid_blocks(w);
  by_chunks_of_four(M, [&](auto mm, int64_t m) {
    const Int4X part{xq.bytes + m * xq.ld, xq.scales + m * nb, nullptr, xq.ld};
    rows<decltype(mm)::value>(w, part, y + m * ldy, ldy, n0, n1);
  });
}

}  // namespace pk
