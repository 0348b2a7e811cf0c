// Bitmask with 4-bit values (kernels.h, BitmaskInt4), AVX2 + FMA: as avx2.cpp's bitmask kernel (8-input
// halves, the kept values put in their lanes by a permutation looked up from the mask byte), with a
// word's values rebuilt from its code bytes: nibbles interleaved into 16 bytes in value order, the
// second half's taken from the first's count on by a byte shuffle, widened, (code − zero) · scale
// rounded once. The float32 bitmask kernel's values and order: its result bit for bit.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "mask_tables.h"
#include "simd.h"

namespace pk {
namespace {


constexpr int64_t kAhead = 8;

template <int MM, int RB>
void block(const BitmaskInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K, KW = (K + 15) / 16, nb = (K + w.block - 1) / w.block;
  const int shift = __builtin_ctzll(uint64_t(w.block));
  const __m128i low = _mm_set1_epi8(15), iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* q[RB];
  const uint16_t* mk[RB];
  const float* sc[RB];
  const uint8_t* zp[RB];
  const uint8_t* next[RB];
  int nib[RB];  // kept values of the current group before this word
  __m256 acc[RB][MM];
  PK_UNROLL
  for (int r = 0; r < RB; ++r) {
    q[r] = w.codes + w.row_off[n + r];
    nib[r] = 0;
    mk[r] = w.masks + (n + r) * KW;
    sc[r] = w.scales + (n + r) * nb;
    zp[r] = w.zeros + (n + r) * nb;
    const int64_t nn = n + kAhead * RB + r < w.N ? n + kAhead * RB + r : n + r;
    next[r] = w.codes + w.row_off[nn];
    _mm_prefetch(reinterpret_cast<const char*>(w.masks + nn * KW), _MM_HINT_T0);
    PK_UNROLL
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  for (int64_t word = 0; word < KW; ++word) {
    const int64_t g = (word * 16) >> shift;
    PK_UNROLL
    for (int r = 0; r < RB; ++r) {
      if ((word & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(next[r] + word * 4), _MM_HINT_T0);
      if ((word & 3) == 0) {  // a new group of codes starts on a byte
        q[r] += (nib[r] + 1) / 2;
        nib[r] = 0;
      }
      const uint32_t bits = mk[r][word];
      if (!bits) continue;
      const uint64_t bytes = word_nibbles(q[r], nib[r]);
      const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(bytes));
      const __m128i inter = _mm_unpacklo_epi8(_mm_and_si128(v, low), _mm_and_si128(_mm_srli_epi16(v, 4), low));
      const __m256 s = _mm256_set1_ps(sc[r][g]), z = _mm256_set1_ps(float(zp[r][g]));
      int before = 0;
      for (int half = 0; half < 2; ++half) {
        const int b = (bits >> (8 * half)) & 0xFF;
        if (!b) continue;
        const __m128i from = half ? _mm_shuffle_epi8(inter, _mm_add_epi8(iota, _mm_set1_epi8(char(before)))) : inter;
        const __m256 packed = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(from)), z), s);
        const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.select[b]));
        const __m256 wv = _mm256_and_ps(_mm256_permutevar8x32_ps(packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.perm[b]))), _mm256_castsi256_ps(sel));
        const int64_t k = word * 16 + half * 8;
        PK_UNROLL
        for (int m = 0; m < MM; ++m) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + m * ldx + k, sel), acc[r][m]);
        before = __builtin_popcount(b);
      }
      nib[r] += __builtin_popcount(bits);
    }
  }
  PK_UNROLL
  for (int r = 0; r < RB; ++r)
    PK_UNROLL
    for (int m = 0; m < MM; ++m) y[m * ldy + n + r] = hsum(acc[r][m]);
}

template <int MM>
void rows(const BitmaskInt4& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block<MM, 4>(w, x, ldx, y, ldy, n);
  for (; n < n1; ++n) block<MM, 1>(w, x, ldx, y, ldy, n);
}

}  // namespace

void gemv_bitmask_int4_avx2(const BitmaskInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  by_chunks_of_four(M, [&](auto mm, int64_t m) { rows<decltype(mm)::value>(w, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1); });
}

// Rows [n0, n1) written dense (the prefill path), a 16-input word per step: its up to 16 kept values
// (value i in nibble i of the word's code qword) decoded by per-lane shifts into two vectors, (code −
// zero) · scale; each mask byte's values put in their lanes by the GEMV's permutation, the high byte's
// taken from the low byte's count on (across the two vectors: a blend on the index).
void decompress_avx2(const BitmaskInt4& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, KW = (K + 15) / 16, nb = (K + w.block - 1) / w.block;
  const int shift = __builtin_ctzll(uint64_t(w.block));
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nib = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * K;
    const uint8_t* q = w.codes + w.row_off[n];
    const uint16_t* mk = w.masks + n * KW;
    int used = 0;
    for (int64_t word = 0; word < KW; ++word) {
      if ((word & 3) == 0) {  // a new group of codes starts on a byte
        q += (used + 1) / 2;
        used = 0;
      }
      const int64_t g = (word * 16) >> shift;
      const __m256 s = _mm256_set1_ps(w.scales[n * nb + g]), z = _mm256_set1_ps(float(w.zeros[n * nb + g]));
      const uint64_t bytes = word_nibbles(q, used);  // (the code buffer is padded past a row's last group)
      uint32_t dw[2];
      std::memcpy(dw, &bytes, 8);
      __m256 vals[2];  // values 0-7, 8-15
      for (int h = 0; h < 2; ++h)
        vals[h] = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(dw[h])), shifts), nib)), z), s);
      const uint32_t bits = mk[word];
      const int c0 = __builtin_popcount(bits & 0xFFu);
      for (int half = 0; half < 2 && word * 16 + half * 8 < K; ++half) {
        const int64_t k = word * 16 + half * 8, lanes = K - k < 8 ? K - k : 8;
        const int b = (bits >> (8 * half)) & 0xFF;
        const __m256i idx = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.perm[b])), _mm256_set1_epi32(half ? c0 : 0));
        const __m256 picked = _mm256_blendv_ps(_mm256_permutevar8x32_ps(vals[0], idx), _mm256_permutevar8x32_ps(vals[1], idx),
                                               _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
        const __m256 wv = _mm256_and_ps(picked, _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.select[b]))));
        if (lanes == 8) _mm256_storeu_ps(row + k, wv);
        else _mm256_maskstore_ps(row + k, _mm256_load_si256(reinterpret_cast<const __m256i*>(kMask.prefix[lanes])), wv);
      }
      used += __builtin_popcount(bits);
    }
  }
}

}  // namespace pk
