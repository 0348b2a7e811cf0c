// AVX2 + FMA kernels (compiled with -mavx2 -mfma): 8 inputs per step. AVX2 has no expand, so the
// kept values of an 8-input byte of the mask are loaded contiguously (masked to their count) and
// put in their lanes by a permutation looked up from the mask byte; x is loaded under the mask.
// Int8 values are widened to floats and multiplied by their block's scale.
#include <immintrin.h>


#include "kernels.h"
#include "mask_tables.h"
#include "simd.h"

namespace pk {
namespace {


constexpr int kPrefetchFloats = 128;

// Eight int8 codes as floats (the value buffers are padded: an 8-byte load never leaves them).
inline __m256 int8x8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }

// RB output rows at once (independent chains), MM rows of x each; prefetching as in avx512.cpp.
// Q: int8 values with a scale per block of inputs (kernels.h), a 16-input word inside one block.
template <bool Dense, bool Q, int MM, int RB>
void block(const Bitmask& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t KW = words(w);
  const int64_t value_bytes = Q ? 1 : 4;
  const int shift = Q ? block_shift(w.q) : 0;
  const float* v[RB];
  const int8_t* q[RB];
  const float* sc[RB];
  const uint16_t* mk[RB];
  __m256 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    if (Q) {
      q[r] = row_qvalues(w, n + r);
      sc[r] = row_scales(w.K, w.q, n + r);
      if (n + RB + r < w.N) _mm_prefetch(reinterpret_cast<const char*>(row_qvalues(w, n + RB + r)), _MM_HINT_T0);
    } else {
      v[r] = row_values(w, n + r);
      if (n + RB + r < w.N) _mm_prefetch(reinterpret_cast<const char*>(row_values(w, n + RB + r)), _MM_HINT_T0);
    }
    if (!Dense) mk[r] = row_masks(w, n + r);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  for (int64_t word = 0; word < KW; ++word) {
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      const char* at = Q ? reinterpret_cast<const char*>(q[r]) : reinterpret_cast<const char*>(v[r]);
      if (!Q || (word & 3) == 0) _mm_prefetch(at + kPrefetchFloats * value_bytes, _MM_HINT_T0);
      const uint32_t all = word * 16 + 16 <= w.K ? 0xFFFFu : (1u << (w.K % 16)) - 1u;
      const uint32_t bits = Dense ? all : mk[r][word];
      const __m256 scale = Q ? _mm256_set1_ps(sc[r][(word * 16) >> shift]) : _mm256_setzero_ps();
      for (int half = 0; half < 2; ++half) {
        const int b = (bits >> (8 * half)) & 0xFF;
        if (!b) {
          if (Dense) (Q ? void(q[r] += 8) : void(v[r] += 8));
          continue;
        }
        const int c = __builtin_popcount(b);
        const __m256 packed = Q ? int8x8(q[r]) : _mm256_maskload_ps(v[r], _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.prefix[c])));
        const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.select[b]));
        __m256 wv = _mm256_and_ps(
            _mm256_permutevar8x32_ps(packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.perm[b]))), _mm256_castsi256_ps(sel));
        if (Q) wv = _mm256_mul_ps(wv, scale);
        const int64_t k = word * 16 + half * 8;
        PK_UNROLL
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + m * ldx + k, sel), acc[r][m]);
        if (Q) q[r] += Dense ? 8 : c;
        else v[r] += Dense ? 8 : c;
      }
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <int MM>
void rows(const Bitmask& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_storage(dense(w), int8(w.q), [&](auto d, auto q) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) block<decltype(d)::value, decltype(q)::value, MM, 4>(w, x, ldx, y, ldy, n);
    for (; n < n1; ++n) block<decltype(d)::value, decltype(q)::value, MM, 1>(w, x, ldx, y, ldy, n);
  });
}

void gemv(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

}  // namespace

void gemv_avx2(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  gemv(w, x, M, ldx, y, ldy, n0, n1);
}

// Rows [n0, n1) written dense (the prefill path), 8 inputs (a mask byte) per step: the byte's kept
// values loaded packed and put in their lanes by the GEMV's permutation, the other lanes zero.
void decompress_avx2(const Bitmask& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, KW = words(w);
  const bool Q = int8(w.q), D = dense(w);
  const int shift = Q ? block_shift(w.q) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    auto [v, q, sc, mk] = bitmask_row(w, n);
    for (int64_t word = 0; word < KW; ++word) {
      const uint32_t bits = D ? (word * 16 + 16 <= K ? 0xFFFFu : (1u << (K % 16)) - 1u) : mk[word];
      const __m256 scale = _mm256_set1_ps(Q ? sc[(word * 16) >> shift] : 0.f);
      for (int half = 0; half < 2 && word * 16 + half * 8 < K; ++half) {
        const int64_t k = word * 16 + half * 8, lanes = K - k < 8 ? K - k : 8;
        const int b = (bits >> (8 * half)) & 0xFF, c = __builtin_popcount(b);
        __m256 wv = _mm256_setzero_ps();
        if (b) {
          const __m256 packed = Q ? int8x8(q) : _mm256_maskload_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.prefix[c])));
          wv = _mm256_and_ps(_mm256_permutevar8x32_ps(packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.perm[b]))),
                             _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.select[b]))));
          if (Q) wv = _mm256_mul_ps(wv, scale);
        }
        if (lanes == 8) _mm256_storeu_ps(row + k, wv);
        else _mm256_maskstore_ps(row + k, _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.prefix[lanes])), wv);
        if (Q) q += D ? 8 : c;
        else v += D ? 8 : c;
      }
    }
  }
}

}  // namespace pk
