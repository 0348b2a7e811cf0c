// 2:4 kernel, AVX2 + FMA: as twofour_avx512.cpp with 16-input windows (8 kept values, one vector):
// the kept values' x are picked from the window's two 8-float halves by two permutations and a
// blend, indices from the window's 16 position bits. Int8 values are widened and scaled per window.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace pk {
namespace {

inline __m256i first_lanes(int64_t count) {  // -1 in lanes [0, count)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(count < 8 ? count : 8)), lane);
}

template <bool Q, int MM, int RB>
void block(const TwoFour& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, windows = (K + 15) / 16, half_k = K / 2, pb = position_bytes(K);
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3), seven = _mm256_set1_epi32(7);
  const int shift = Q ? block_shift(w.q) : 0;
  const float* v[RB];
  const int8_t* q[RB];
  const float* sc[RB];
  const uint8_t* p[RB];
  __m256 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    v[r] = Q ? nullptr : w.values + (n + r) * half_k;
    q[r] = Q ? w.q.values + (n + r) * half_k : nullptr;
    sc[r] = Q ? row_scales(K, w.q, n + r) : nullptr;
    p[r] = w.positions + (n + r) * pb;
    if (n + RB + r < w.N) {
      const char* nxt = Q ? reinterpret_cast<const char*>(w.q.values + (n + RB + r) * half_k) : reinterpret_cast<const char*>(w.values + (n + RB + r) * half_k);
      _mm_prefetch(nxt, _MM_HINT_T0);
    }
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  for (int64_t win = 0; win < windows; ++win) {
    const int64_t in_left = K - win * 16;
    const __m256i xlo = first_lanes(in_left), xhi = first_lanes(in_left - 8), vals = first_lanes(in_left / 2);
    __m256 x0[MM], x1[MM];
    PK_UNROLL
    for (int m = 0; m < MM; ++m) {
      x0[m] = _mm256_maskload_ps(x + m * ldx + win * 16, xlo);
      x1[m] = _mm256_maskload_ps(x + m * ldx + win * 16 + 8, xhi);
    }
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      uint16_t bits = 0;
      const int64_t left = pb - win * 2;
      if (left >= 2) std::memcpy(&bits, p[r] + win * 2, 2);  // a single 16-bit load
      else std::memcpy(&bits, p[r] + win * 2, size_t(left));
      const __m256i idx = _mm256_add_epi32(base, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts), three));
      const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
      __m256 wv;
      if (Q) {  // a 16-input window is inside one block of ≥ 16 inputs; the buffers are padded past the last one
        const __m256 codes = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + win * 8))));
        wv = _mm256_and_ps(_mm256_mul_ps(codes, _mm256_set1_ps(sc[r][(win * 16) >> shift])), _mm256_castsi256_ps(vals));
      } else {
        wv = _mm256_maskload_ps(v[r] + win * 8, vals);
      }
      PK_UNROLL
      for (int m = 0; m < MM; ++m) {
        const __m256 xs = _mm256_blendv_ps(_mm256_permutevar8x32_ps(x0[m], idx), _mm256_permutevar8x32_ps(x1[m], idx), hi);
        acc[r][m] = _mm256_fmadd_ps(wv, xs, acc[r][m]);
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <bool Q, int MM>
void rows(const TwoFour& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<Q, MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<Q, MM, 1>(w, x, ldx, y, ldy, n);
}

}  // namespace

void gemv_twofour_avx2(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { int8(w.q) ? rows<true, decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1)
                                                            : rows<false, decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

namespace {

// Per position byte (two groups of 4 inputs): which of 4 kept values each of its 8 lanes takes
// (vpermps indices) and whether it takes one (-1) or is zero — the scalar decompression's writes in
// its order (a later value wins a lane written twice).
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t keep[256][8];
};
constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int b = 0; b < 256; ++b) {
    const int lanes[4] = {b & 3, (b >> 2) & 3, 4 + ((b >> 4) & 3), 4 + ((b >> 6) & 3)};
    for (int value = 0; value < 4; ++value) {
      t.idx[b][lanes[value]] = value;
      t.keep[b][lanes[value]] = -1;
    }
  }
  return t;
}
constexpr ExpandTable kExpand = make_expand_table();

}  // namespace

// Rows [n0, n1) of a 2:4 weight written dense (the prefill path), 8 inputs (a position byte, 4 kept
// values) per step: the values loaded as 4 lanes and moved to their inputs' lanes by one vpermps.
void decompress_avx2(const TwoFour& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, full = K / 8;
  const bool Q = int8(w.q);
  const int shift = Q ? block_shift(w.q) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    const auto [v, q, sc, p] = two_four_row(w, n);
    for (int64_t j = 0; j < full; ++j) {
      __m128 four;
      if (Q) {
        int32_t bytes;
        std::memcpy(&bytes, q + 4 * j, 4);
        four = _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bytes))), _mm_set1_ps(sc[(8 * j) >> shift]));
      } else {
        four = _mm_loadu_ps(v + 4 * j);
      }
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[p[j]]));
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep[p[j]])));
      _mm256_storeu_ps(row + 8 * j, _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), idx), keep));
    }
    if (K % 8) {  // a last group of 4 inputs (the low half of its position byte)
      for (int64_t k = 8 * full; k < K; ++k) row[k] = 0.f;
      const int nib = p[full] & 0xF;
      const int64_t i = 4 * full;
      row[8 * full + (nib & 3)] = Q ? float(q[i]) * sc[(8 * full) >> shift] : v[i];
      row[8 * full + (nib >> 2)] = Q ? float(q[i + 1]) * sc[(8 * full) >> shift] : v[i + 1];
    }
  }
}

// Rows [n0, n1) of a 2:4 weight with 4-bit values written dense (the prefill path): a 32-input window's
// 16 kept values decoded from its code qword (value j in nibble 8·(j & 1) + (j >> 1): even values in the
// low dword, odd ones in the high one, one variable shift per lane), (code − zero) · scale, then each
// position byte's 4 values moved to their lanes as for float values.
void decompress_avx2(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out) {
  const __m256i shifts_lo = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12), shifts_hi = _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28);
  const __m256i nib = _mm256_set1_epi32(15), upper = _mm256_set1_epi32(4);
  for_each_two_four_int4_window(w, n0, n1, out, [&](const uint8_t* q, const uint8_t* p, float scale, float zero, bool, float* dst) {
    uint32_t dw[2];
    std::memcpy(dw, q, 8);
    const __m256i pair = _mm256_setr_epi32(int(dw[0]), int(dw[1]), int(dw[0]), int(dw[1]), int(dw[0]), int(dw[1]), int(dw[0]), int(dw[1]));
    const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
    const __m256 vals[2] = {  // values 0-7, 8-15
        _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(pair, shifts_lo), nib)), z), s),
        _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(pair, shifts_hi), nib)), z), s)};
    for (int j = 0; j < 4; ++j) {  // position byte j: inputs 8j .. 8j + 7, values 4j .. 4j + 3
      __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[p[j]]));
      if (j & 1) idx = _mm256_add_epi32(idx, upper);
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep[p[j]])));
      _mm256_storeu_ps(dst + 8 * j, _mm256_and_ps(_mm256_permutevar8x32_ps(vals[j >> 1], idx), keep));
    }
  });
}

}  // namespace pk
