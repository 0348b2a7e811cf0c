// Scalar reference (no SIMD): the definition every SIMD path is tested against, and the path used
// where neither AVX2+FMA nor AVX-512 is present.
#include "kernels.h"

namespace pk {

void gemv_scalar(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t KW = words(w);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* mk = dense(w) ? nullptr : row_masks(w, n);
    for (int64_t m = 0; m < M; ++m) {
      const float* v = row_values(w, n);
      float acc = 0.f;
      for (int64_t word = 0; word < KW; ++word) {
        const uint32_t all = word * 16 + 16 <= w.K ? 0xFFFFu : (1u << (w.K % 16)) - 1u;
        for (uint32_t bits = mk ? mk[word] : all; bits; bits &= bits - 1) acc += *v++ * x[m * ldx + word * 16 + __builtin_ctz(bits)];
      }
      y[m * ldy + n] = acc;
    }
  }
}

void gemv_sparse_x_scalar(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
  for (int64_t a = 0; a < count; ++a) {
    const float* row = wt + int64_t(idx[a]) * N;
    for (int64_t n = n0; n < n1; ++n) y[n] += vals[a] * row[n];
  }
}

void decompress(const Bitmask& w, int64_t n0, int64_t n1, float* out) {
  const int64_t KW = words(w);
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    for (int64_t k = 0; k < w.K; ++k) row[k] = 0.f;
    const float* v = row_values(w, n);
    if (dense(w)) {
      for (int64_t k = 0; k < w.K; ++k) row[k] = v[k];
      continue;
    }
    const uint16_t* mk = row_masks(w, n);
    for (int64_t word = 0; word < KW; ++word) {
      for (uint32_t bits = mk[word]; bits; bits &= bits - 1) row[word * 16 + __builtin_ctz(bits)] = *v++;
    }
  }
}

void gemv_twofour_scalar(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t pb = position_bytes(w.K), groups = w.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = w.values + n * (w.K / 2);
    const uint8_t* p = w.positions + n * pb;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int nib = (p[g / 2] >> (4 * (g % 2))) & 0xF;
        acc += v[2 * g] * x[m * ldx + 4 * g + (nib & 3)] + v[2 * g + 1] * x[m * ldx + 4 * g + (nib >> 2)];
      }
      y[m * ldy + n] = acc;
    }
  }
}

void decompress(const TwoFour& w, int64_t n0, int64_t n1, float* out) {
  const int64_t pb = position_bytes(w.K), groups = w.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    for (int64_t k = 0; k < w.K; ++k) row[k] = 0.f;
    const float* v = w.values + n * (w.K / 2);
    const uint8_t* p = w.positions + n * pb;
    for (int64_t g = 0; g < groups; ++g) {
      const int nib = (p[g / 2] >> (4 * (g % 2))) & 0xF;
      row[4 * g + (nib & 3)] = v[2 * g];
      row[4 * g + (nib >> 2)] = v[2 * g + 1];
    }
  }
}

}  // namespace pk
