// Scalar reference (no SIMD): the definition every SIMD path is tested against, and the path used
// where neither AVX2+FMA nor AVX-512 is present.
#include <cmath>

#include "kernels.h"

namespace pk {
namespace {

// The kept values of one row in order: value(i, k) is the i-th kept value, at input k (its scale's block).
struct RowValues {
  const float* v = nullptr;
  const int8_t* q = nullptr;
  const float* scales = nullptr;
  int shift = 0;
  float operator()(int64_t i, int64_t k) const { return q ? float(q[i]) * scales[k >> shift] : v[i]; }
};

RowValues row(const Bitmask& w, int64_t n) {
  if (int8(w.q)) return {nullptr, row_qvalues(w, n), row_scales(w.K, w.q, n), block_shift(w.q)};
  return {row_values(w, n)};
}

RowValues row(const TwoFour& w, int64_t n) {
  if (int8(w.q)) return {nullptr, w.q.values + n * (w.K / 2), row_scales(w.K, w.q, n), block_shift(w.q)};
  return {w.values + n * (w.K / 2)};
}

}  // namespace

void gemv_scalar(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t KW = words(w);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* mk = dense(w) ? nullptr : row_masks(w, n);
    const RowValues v = row(w, n);
    for (int64_t m = 0; m < M; ++m) {
      int64_t i = 0;
      float acc = 0.f;
      for (int64_t word = 0; word < KW; ++word) {
        const uint32_t all = word * 16 + 16 <= w.K ? 0xFFFFu : (1u << (w.K % 16)) - 1u;
        for (uint32_t bits = mk ? mk[word] : all; bits; bits &= bits - 1) {
          const int64_t k = word * 16 + __builtin_ctz(bits);
          acc += v(i++, k) * x[m * ldx + k];
        }
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

namespace {
inline float int4_x_code(const Int4InputMajor& w, int64_t k, int64_t n) {
  const uint8_t byte = *input_codes(w, k, (n / 32) * 16 + (n % 32 & 15));
  return float(n % 32 < 16 ? byte & 15 : byte >> 4);
}
}  // namespace

void gemv_int4_x_scalar(const Int4InputMajor& w, const ActiveInputs& a, float* out) {
  for_each_block_tile(w, a, 1, out, [&](int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float xs, int64_t, float* y) {
    for (int64_t j = 0; j < 32; ++j) {  // (outputs past N: the padding's codes, scales and offsets are 0)
      float acc = 0.f;
      for (int64_t p = p0; p < p1; ++p) acc += a.vals[p] * int4_x_code(w, a.idx[p], 2 * at + j);
      const float sj = grid_value(w, s, j), oj = grid_value(w, o, j);
      y[j] += w.zero_point ? sj * (acc - oj * xs) : sj * acc + oj * xs;
    }
  });
}

void gemv_int4_x_int8_scalar(const Int4InputMajor& w, const ActiveInputs& a, float* out) {
  for_each_block_tile(w, a, 1, out, [&](int64_t p0, int64_t p1, int64_t at, const uint8_t* s, const uint8_t* o, float xs, int64_t, float* y) {
    const float sx = a.qs[p0];
    for (int64_t j = 0; j < 32; ++j) {
      int32_t dot = 0;
      for (int64_t p = p0; p < p1; ++p) dot += int32_t(a.q[p]) * int32_t(int4_x_code(w, a.idx[p], 2 * at + j));
      const float acc = float(dot), sj = grid_value(w, s, j), oj = grid_value(w, o, j);
      y[j] = w.zero_point ? std::fma(sj, std::fma(-oj, xs, sx * acc), y[j]) : std::fma(sj * sx, acc, std::fma(oj, xs, y[j]));
    }
  });
}

void decompress_int4_x_scalar(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* s = block_scales(w, k / 32);
    const uint8_t* o = block_offsets(w, k / 32);
    for (int64_t n = n0; n < n1; ++n) {
      const float code = int4_x_code(w, k, n), sn = grid_value(w, s, n), on = grid_value(w, o, n);
      out[(k - k0) * ldo + (n - n0)] = w.zero_point ? (code - on) * sn : std::fma(code, sn, on);
    }
  }
}

void decompress(const Bitmask& w, int64_t n0, int64_t n1, float* out) {
  const int64_t KW = words(w);
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    for (int64_t k = 0; k < w.K; ++k) row[k] = 0.f;
    const RowValues v = pk::row(w, n);
    if (dense(w)) {
      for (int64_t k = 0; k < w.K; ++k) row[k] = v(k, k);
      continue;
    }
    const uint16_t* mk = row_masks(w, n);
    int64_t i = 0;
    for (int64_t word = 0; word < KW; ++word) {
      for (uint32_t bits = mk[word]; bits; bits &= bits - 1) {
        const int64_t k = word * 16 + __builtin_ctz(bits);
        row[k] = v(i++, k);
      }
    }
  }
}

void gemv_twofour_scalar(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t pb = position_bytes(w.K), groups = w.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const RowValues v = row(w, n);
    const uint8_t* p = w.positions + n * pb;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int nib = (p[g / 2] >> (4 * (g % 2))) & 0xF;
        acc += v(2 * g, 4 * g) * x[m * ldx + 4 * g + (nib & 3)] + v(2 * g + 1, 4 * g) * x[m * ldx + 4 * g + (nib >> 2)];
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
    const RowValues v = pk::row(w, n);
    const uint8_t* p = w.positions + n * pb;
    for (int64_t g = 0; g < groups; ++g) {
      const int nib = (p[g / 2] >> (4 * (g % 2))) & 0xF;
      row[4 * g + (nib & 3)] = v(2 * g, 4 * g);
      row[4 * g + (nib >> 2)] = v(2 * g + 1, 4 * g);
    }
  }
}

// 4-bit dense (Int4Dense): weight k of row n, fma(code, scale, offset) rounded once (zero-point form:
// (code − zero) · scale), as the SIMD paths.
inline float int4_weight(const Int4Dense& w, int64_t n, int64_t k) {
  const int64_t b = k / kInt4Block, j = k % kInt4Block;
  const uint8_t byte = row_codes(w, n)[b * 16 + (j & 15)];
  const int code = j < 16 ? (byte & 15) : (byte >> 4);
  const float s = grid_at(w, row_grid(w, w.scales, n), b), o = grid_at(w, row_grid(w, w.offsets, n), b);
  return w.zero_point ? (float(code) - o) * s : std::fma(float(code), s, o);
}

void gemv_int4_scalar(const Int4Dense& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc += int4_weight(w, n, k) * x[m * ldx + k];
      y[m * ldy + n] = acc;
    }
}

void decompress(const Int4Dense& w, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < w.K; ++k) out[(n - n0) * w.K + k] = int4_weight(w, n, k);
}

// 2:4 with 4-bit values (TwoFourInt4): kept value i of row n, (code − zero) · scale rounded once.
inline float twofour_int4_value(const TwoFourInt4& w, int64_t n, int64_t i) {
  const int64_t win = i / 16, j = i % 16;
  const int64_t nibble = 8 * (j & 1) + (j >> 1);
  const uint8_t byte = row_codes(w, n)[code_offset(w, win) + nibble / 2];
  const int code = (nibble & 1) ? (byte >> 4) : (byte & 15);
  const int64_t g = (4 * (i / 2)) / w.block;
  return (float(code) - float(row_zeros(w, n)[g])) * row_scales(w, n)[g];
}

void gemv_twofour_int4_scalar(const TwoFourInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t groups = w.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = row_positions(w, n);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int nib = (p[position_offset(w, g / 8) + (g % 8) / 2] >> (4 * (g % 2))) & 0xF;
        acc += twofour_int4_value(w, n, 2 * g) * x[m * ldx + 4 * g + (nib & 3)] + twofour_int4_value(w, n, 2 * g + 1) * x[m * ldx + 4 * g + (nib >> 2)];
      }
      y[m * ldy + n] = acc;
    }
  }
}

void decompress(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out) {
  const int64_t groups = w.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    for (int64_t k = 0; k < w.K; ++k) row[k] = 0.f;
    const uint8_t* p = row_positions(w, n);
    for (int64_t g = 0; g < groups; ++g) {
      const int nib = (p[position_offset(w, g / 8) + (g % 8) / 2] >> (4 * (g % 2))) & 0xF;
      row[4 * g + (nib & 3)] = twofour_int4_value(w, n, 2 * g);
      row[4 * g + (nib >> 2)] = twofour_int4_value(w, n, 2 * g + 1);
    }
  }
}

// Bitmask with 4-bit values (BitmaskInt4): calls f(k, value) for every kept input k of row n in order.
template <class F>
inline void for_each_bitmask_int4(const BitmaskInt4& w, int64_t n, F f) {
  const int64_t KW = (w.K + 15) / 16, nb = (w.K + w.block - 1) / w.block;
  const uint8_t* q = w.codes + w.row_off[n];
  int i = 0;  // kept values of the group so far
  for (int64_t word = 0; word < KW; ++word) {
    if (word % 4 == 0) {  // a new group of 64 inputs starts on a byte
      q += (i + 1) / 2;
      i = 0;
    }
    const uint32_t bits = w.masks[n * KW + word];
    const int64_t g = (word * 16) / w.block;
    const float s = w.scales[n * nb + g], z = float(w.zeros[n * nb + g]);
    for (uint32_t b = bits; b; b &= b - 1, ++i) {
      const int code = (i & 1) ? (q[i / 2] >> 4) : (q[i / 2] & 15);
      f(word * 16 + __builtin_ctz(b), (float(code) - z) * s);
    }
  }
}

void gemv_bitmask_int4_scalar(const BitmaskInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for_each_bitmask_int4(w, n, [&](int64_t k, float v) { acc += v * x[m * ldx + k]; });
      y[m * ldy + n] = acc;
    }
}

void decompress(const BitmaskInt4& w, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    for (int64_t k = 0; k < w.K; ++k) row[k] = 0.f;
    for_each_bitmask_int4(w, n, [&](int64_t k, float v) { row[k] = v; });
  }
}

}  // namespace pk
