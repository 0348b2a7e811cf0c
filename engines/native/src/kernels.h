// Sparse linear kernels: y[M][N] = x[M][K] · Wᵀ for a weight W[N][K] stored as a bitmask.
//
// Per output row n: which inputs k are kept, a bit per input in 16-bit words (masks
// uint16[N][KW], KW = ceil(K/16), bit j of word w = input 16w + j; bits beyond K are zero), and
// the kept values in input order (values float[row_off[N]], row n's at row_off[n] .. row_off[n+1]).
// A 2:4 weight is this format too: its positions (2 bits per kept value, 4 bits per group of four)
// become a 4-bit group mask of the same size when the weight is loaded. Every kernel reads only the
// kept values and the bit per weight: that is the point.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pk {

// Int8 values (a quantized model's weights): when `values` is set, the weight's kept values are these
// int8 codes instead of floats, at the same offsets, and a value is code · scale with one float scale
// per output row and block of `block` inputs (scales float[N][ceil(K/block)], block a power of two
// ≥ 16). code · scale in fp32 is exactly the model's dequantized weight, so the result is the fp32
// kernel's on those weights while a quarter of the value bytes is read.
struct Int8Values {
  const int8_t* values = nullptr;
  const float* scales = nullptr;
  int64_t block = 0;
  // Set (float[N][K/32]: 128 · Σ codes · scale per row and block): a dense weight in blocks of 32,
  // K % 64 == 0, whose activations may be quantized to int8 per block (accuracy_level 4 or the
  // int8_activations option) — the VNNI kernel runs it (reading corr) where the CPU has AVX-512 VNNI,
  // the AVX2 kernel (int8_int8x_avx2.cpp; corr only its flag) where the instruction set is AVX2;
  // elsewhere the fp32-activation kernels do.
  const float* corr = nullptr;
  // Set (float[N]: each row's Σ of its values): a dense weight in blocks of 32, K % 64 == 0, that the
  // 16-bit kernel (vnni_avx512.cpp, gemv_int8_x16_avx512) may run where the CPU has AVX-512 VNNI.
  const float* row_sums = nullptr;
};

// Rows of x quantized per block of 32 inputs: unsigned bytes (qx + 128) u8[M][ld], scales[M][K/32].
struct QuantizedX {
  const uint8_t* u8;
  const float* scales;
  int64_t ld;
};

struct Bitmask {
  int64_t N, K;
  const uint16_t* masks;
  const float* values;
  const int64_t* row_off;
  Int8Values q = {};
};
// masks == nullptr (and row_off == nullptr) marks a dense weight: values float[N][K] row-major. The
// same kernels run it (every bit set), so a dense layer kept dense (an embedding used as the output
// head, a layer left unpruned) needs no second code path in the host.

// 2:4 as stored: values float[N][K/2] (two kept of every four inputs, in input order), positions
// uint8[N][ceil(K/8)] (2 bits per kept value: the first group of a byte in bits 0-3, the second in
// bits 4-7; the high half of a row's last byte unused when K % 8 == 4). K % 4 == 0.
struct TwoFour {
  int64_t N, K;
  const float* values;
  const uint8_t* positions;
  Int8Values q = {};
};

// 2:4 with 4-bit values (a 2:4 weight quantized to 4 bits by the quantize pass, zeros kept): positions
// as TwoFour; codes uint8[N][K/4], per 32-input window 8 bytes read as one little-endian qword whose
// nibble 8·(j & 1) + (j >> 1) is the window's kept value j (even values in the low dword, odd ones in
// the high one: a broadcast qword and one shift per lane give every value its own lane); a value is (code − zero) · scale rounded
// once, with one float scale and one uint8 zero point per output row and block of `block` inputs (a
// power of two ≥ 32; scales and zeros [N][ceil(K/block)]). K % 32 == 0. Per weight: 2 bits of code,
// 1 of position, and the block's 5 bytes: 4.25 bits at block 32, 3.6 at 64 (the int4 dense format
// below: 6).
// With `stride` set, the four arrays are interleaved row by row (scales, zeros, codes, positions,
// `stride` bytes per row, so a matrix is one sequential stream): row n of each starts `n · stride` bytes
// after its pointer.
// With `paired` set (the host's layout: engines/native NativeWeight), rows are held two at a time, `stride`
// bytes per pair (an odd N's last pair padded with a zero row): the pair's scales (row 2i's blocks, then
// row 2i + 1's), its zero points (the same order), then per step of 64 inputs (two windows; a last lone
// window's step padded with zeros) kPairStep bytes: the codes of (row, window) (0, 0), (1, 0), (0, 1),
// (1, 1), 8 bytes each, then the positions of row 0's two windows and row 1's, 4 bytes each. So the
// 16-bit kernel loads a step of both rows as one broadcast of codes and one of positions. Every
// kernel finds a window through code_offset / position_offset from its row's pointers.
// row_sums (optional): each row's Σ of its values, for the 16-bit kernel (twofour_int4_vnni_avx512.cpp).
// nibbles (optional; the host builds it where the int8-activation AVX2 kernel runs,
// twofour_int4_int8x_avx2.cpp): the weight again, per pair of rows (an odd N padded with a zero row)
// nibble_head(nb) + 24 · K / 32 bytes: the pair's float scales [block][row], int32 128 · Σ (code − zero)
// of each block's kept values [block][row], uint8 zero points [block][row], zeros to a multiple of 32,
// then per 32-input window 24 bytes. The window's 32 kept values are numbered o = 16h + 8r + j (half h:
// inputs 16h .. 16h + 15; row r; j-th kept value of the half, in input order): code byte i (0 .. 15) holds
// value i's code in its low nibble and value 16 + i's in its high one; then a qword of positions, value
// o = 4d + e's input within its group of four at bits 32 · (d & 1) + 8e + 2 · (d >> 1) — so one
// broadcast and one variable shift per dword put every value's 2 bits at the bottom of its own byte.
// 3 bits a weight and the grid.
struct TwoFourInt4 {
  int64_t N, K;
  const uint8_t* codes;
  const uint8_t* positions;
  const float* scales;
  const uint8_t* zeros;
  int64_t block;
  int64_t stride = 0;
  const float* row_sums = nullptr;
  bool paired = false;
  const uint8_t* nibbles = nullptr;
};
constexpr int64_t kPairStep = 48;  // bytes of a step of a pair of rows in the paired layout
// Bytes of a pair's grid in front of its windows in the nibble layout (nb grid blocks a row).
inline int64_t nibble_head(int64_t nb) { return (18 * nb + 31) / 32 * 32; }
constexpr int64_t kNibbleWindow = 24;  // bytes of a window of a pair of rows in the nibble layout

// Bitmask with 4-bit values (an unstructured weight quantized to 4 bits, zeros kept): masks as Bitmask;
// codes uint8, row n's starting at byte row_off[n]: per group of 64 inputs (four mask words) its c kept
// values' codes, two a byte (the group's kept value 2i in the low nibble, 2i + 1 in the high one),
// ceil(c / 2) bytes, so every group starts on a byte and a word's codes start at the nibble after the
// previous word's (word_nibbles); a value is (code − zero) · scale rounded once, one float scale and one
// uint8 zero point per output row and block of `block` inputs (a power of two ≥ 16; scales and zeros
// [N][ceil(K/block)]). The code buffer is padded by 16 bytes and the mask buffer by 8 (a word's codes
// are read 9 bytes at once, a group's 32; a group's four mask words as one 64-bit load).
// row_sums (optional): each row's Σ of its values, for the 16-bit kernel (bitmask_int4_vnni_avx512.cpp).
struct BitmaskInt4 {
  int64_t N, K;
  const uint16_t* masks;
  const uint8_t* codes;
  const int64_t* row_off;
  const float* scales;
  const uint8_t* zeros;
  int64_t block;
  const float* row_sums = nullptr;
};
constexpr int64_t kBitmaskInt4Group = 64;  // inputs per group of codes (core.sparse_format.BITMASK_INT4_GROUP)

// The 16 nibbles from nibble `nib` of a group's codes (nib < 64; bytes up to nib / 2 + 8 are read).
inline uint64_t word_nibbles(const uint8_t* group, int nib) {
  uint64_t lo;
  std::memcpy(&lo, group + nib / 2, 8);
  const int s = (nib & 1) * 4;
  return (lo >> s) | (uint64_t(group[nib / 2 + 8]) << 1 << (63 - s));
}

// 4-bit codes (dense): every weight w[n][k] = fma(code, scale, offset) rounded once to float, one
// scale and one offset per output row and block of 32 inputs (K % 32 == 0). Row n's codes are K/2
// bytes, 16 per block: byte j of a block holds input j in its low nibble and input j + 16 in its
// high nibble (GGUF's Q4_1 order). A weight dequantized from an asymmetric 4-bit block format (Q4_1:
// scale and minimum per 32 weights) is held exactly, so the kernels compute with the model's own
// weights while reading an eighth of the float bytes (plus 8 bytes of scale and offset per block).
// Zero-point form (zero_point set): `offsets` holds each block's zero point z (a small integer, as a
// float) and a weight is (code − z) · scale rounded once — the quantize pass's 4-bit grid, exactly.
// With `stride` set, codes, scales and offsets are interleaved row by row (`stride` bytes per row, each
// array's row n `n · stride` bytes after its pointer: a matrix is one sequential stream).
// Half grid (half set): scales and offsets are IEEE fp16 (uint16) instead of float — GGUF's Q4_1 stores
// its scale and minimum as fp16, so they are held exactly in 2 bytes each (5 bits per weight instead of
// 6); each is widened exactly to float before use, so the weights, and the results, are the same. The
// host sets it only when every value is a normal fp16 number or zero (half_to_float's domain).
struct Int4Dense {
  int64_t N, K;
  const uint8_t* codes;
  const float* scales;
  const float* offsets;
  bool zero_point = false;
  int64_t stride = 0;
  bool half = false;
  // A row subset (the CATS decode's up projection): row n of this view is row rows[n] of the arrays,
  // and N counts the listed rows; null: rows 0 .. N-1.
  const int32_t* rows = nullptr;
};
constexpr int64_t kInt4Block = 32;

// Internal linkage: the helpers are compiled into every instruction set's file with that file's
// flags, and must not be shared between them by the linker.
namespace {
inline int64_t words(const Bitmask& w) { return (w.K + 15) / 16; }
inline bool dense(const Bitmask& w) { return w.masks == nullptr; }
inline const float* row_values(const Bitmask& w, int64_t n) { return dense(w) ? w.values + n * w.K : w.values + w.row_off[n]; }
inline const uint16_t* row_masks(const Bitmask& w, int64_t n) { return w.masks + n * words(w); }
inline int64_t position_bytes(int64_t K) { return (K + 7) / 8; }
inline bool int8(const Int8Values& q) { return q.values != nullptr; }
inline int64_t scale_blocks(int64_t K, const Int8Values& q) { return (K + q.block - 1) / q.block; }
inline int block_shift(const Int8Values& q) { return __builtin_ctzll(uint64_t(q.block)); }
// Where row n's int8 values start (the same offsets as the float values'), and its scales.
inline const int8_t* row_qvalues(const Bitmask& w, int64_t n) { return dense(w) ? w.q.values + n * w.K : w.q.values + w.row_off[n]; }
inline const float* row_scales(int64_t K, const Int8Values& q, int64_t n) { return q.scales + n * scale_blocks(K, q); }
// Row n of an Int4Dense's arrays (interleaved or separate).
inline int64_t stored_row(const Int4Dense& w, int64_t n) { return w.rows ? int64_t(w.rows[n]) : n; }
inline const uint8_t* row_codes(const Int4Dense& w, int64_t n) { return w.codes + stored_row(w, n) * (w.stride ? w.stride : w.K / 2); }
inline const float* row_grid(const Int4Dense& w, const float* grid, int64_t n) {
  return reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(grid) + stored_row(w, n) * (w.stride ? w.stride : (w.half ? 2 : 4) * (w.K / 32)));
}
// An fp16 number (normal or ±0) widened to float exactly: its exponent and mantissa moved into a
// float's fields, then rebiased by 2^112 (exact: a power of two, no rounding), and the sign put back.
inline float half_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h & 0x7fff) << 13;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  f *= 0x1p112f;
  uint32_t out;
  __builtin_memcpy(&out, &f, 4);
  out |= uint32_t(h & 0x8000) << 16;
  __builtin_memcpy(&f, &out, 4);
  return f;
}
// Block b's scale or offset in a row of an Int4Dense grid (row_grid), float or half (HALF: w.half).
template <bool HALF>
inline float grid_at(const float* row, int64_t b) {
  if constexpr (HALF) return half_to_float(reinterpret_cast<const uint16_t*>(row)[b]);
  else return row[b];
}
inline float grid_at(const Int4Dense& w, const float* row, int64_t b) { return w.half ? grid_at<true>(row, b) : grid_at<false>(row, b); }
// Calls f(zp, half) with std::bool_constant values for an Int4Dense's grid form, so a kernel
// instantiates its row template once per form.
template <class F>
inline void by_int4_grid(const Int4Dense& w, F f) {
  using T = std::true_type;
  using N = std::false_type;
  if (w.zero_point) w.half ? f(T{}, T{}) : f(T{}, N{});
  else w.half ? f(N{}, T{}) : f(N{}, N{});
}
// A 4-bit kernel's rows n .. n + RB − 1 of an Int4Dense: their codes, scales and offsets, and the codes
// of the rows `ahead` · RB on (for the kernel to prefetch line by line; their scales and offsets are
// prefetched here).
template <int RB>
struct Int4Rows {
  const uint8_t* q[RB];
  const float* sc[RB];
  const float* of[RB];
  const char* next[RB];
  Int4Rows(const Int4Dense& w, int64_t n, int64_t ahead) {
    for (int r = 0; r < RB; ++r) {
      const int64_t nn = n + ahead * RB + r < w.N ? n + ahead * RB + r : n + r;
      q[r] = row_codes(w, n + r);
      sc[r] = row_grid(w, w.scales, n + r);
      of[r] = row_grid(w, w.offsets, n + r);
      next[r] = reinterpret_cast<const char*>(row_codes(w, nn));
      __builtin_prefetch(row_grid(w, w.scales, nn));
      __builtin_prefetch(row_grid(w, w.offsets, nn));
    }
  }
};
// The row loop of the int4 decompressions (the prefill path) of every instruction set: for each row n
// in [n0, n1) and block b, block(its 16 code bytes, its scale, its offset, its 32 floats of out).
template <class Block>
inline void for_each_int4_block(const Int4Dense& w, int64_t n0, int64_t n1, float* out, Block block) {
  const int64_t nb = w.K / kInt4Block;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    const uint8_t* q = row_codes(w, n);
    const float *sc = row_grid(w, w.scales, n), *of = row_grid(w, w.offsets, n);
    for (int64_t b = 0; b < nb; ++b) block(q + b * 16, grid_at(w, sc, b), grid_at(w, of, b), row + b * 32);
  }
}
// Row n of a TwoFour: its float values, or its int8 codes and their scales, and its position bytes.
struct TwoFourRow {
  const float* v;
  const int8_t* q;
  const float* sc;
  const uint8_t* p;
};
inline TwoFourRow two_four_row(const TwoFour& w, int64_t n) {
  const bool Q = int8(w.q);
  return {Q ? nullptr : w.values + n * (w.K / 2), Q ? w.q.values + n * (w.K / 2) : nullptr, Q ? row_scales(w.K, w.q, n) : nullptr,
          w.positions + n * position_bytes(w.K)};
}
// Row n of a Bitmask: its float values, or its int8 codes and their scales, and its masks (null: dense).
struct BitmaskRow {
  const float* v;
  const int8_t* q;
  const float* sc;
  const uint16_t* mk;
};
inline BitmaskRow bitmask_row(const Bitmask& w, int64_t n) {
  const bool Q = int8(w.q);
  return {Q ? nullptr : row_values(w, n), Q ? row_qvalues(w, n) : nullptr, Q ? row_scales(w.K, w.q, n) : nullptr, dense(w) ? nullptr : row_masks(w, n)};
}
// Row n of a TwoFourInt4's arrays (separate, interleaved by rows or paired), and the byte offsets of
// window win's 8 code bytes and 4 position bytes from its row's pointers.
inline int64_t grid_blocks(const TwoFourInt4& w) { return (w.K + w.block - 1) / w.block; }
inline const uint8_t* row_codes(const TwoFourInt4& w, int64_t n) {
  return w.paired ? w.codes + (n >> 1) * w.stride + 8 * (n & 1) : w.codes + n * (w.stride ? w.stride : w.K / 4);
}
inline const uint8_t* row_positions(const TwoFourInt4& w, int64_t n) {
  return w.paired ? w.positions + (n >> 1) * w.stride + 8 * (n & 1) : w.positions + n * (w.stride ? w.stride : position_bytes(w.K));
}
inline const float* row_scales(const TwoFourInt4& w, int64_t n) {
  const int64_t at = w.paired ? (n >> 1) * w.stride + (n & 1) * 4 * grid_blocks(w) : n * (w.stride ? w.stride : 4 * grid_blocks(w));
  return reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(w.scales) + at);
}
inline const uint8_t* row_zeros(const TwoFourInt4& w, int64_t n) {
  return w.zeros + (w.paired ? (n >> 1) * w.stride + (n & 1) * grid_blocks(w) : n * (w.stride ? w.stride : grid_blocks(w)));
}
inline int64_t code_offset(const TwoFourInt4& w, int64_t win) { return w.paired ? (win >> 1) * kPairStep + 16 * (win & 1) : 8 * win; }
inline int64_t position_offset(const TwoFourInt4& w, int64_t win) { return w.paired ? (win >> 1) * kPairStep + 4 * (win & 1) : 4 * win; }
// Whether a float kernel prefetches the rows ahead at window win: separate or row-interleaved, their codes
// every 8 windows (a 64-byte line) and positions every 16; paired, each step's start (its 48 bytes hold
// both, and every line of the pair is some step's start's or the next one's).
inline bool prefetch_codes_at(const TwoFourInt4& w, int64_t win) { return w.paired ? (win & 1) == 0 : (win & 7) == 0; }
inline bool prefetch_positions_at(const TwoFourInt4& w, int64_t win) { return !w.paired && (win & 15) == 0; }
// The row and window loop of the 2:4-int4 decompressions (the prefill path) of every instruction set:
// for each row n in [n0, n1) and 32-input window, window(its 8 code bytes, its 4 position bytes, its
// block's scale and zero point, whether it starts a block, its 32 floats of out).
template <class Window>
inline void for_each_two_four_int4_window(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out, Window window) {
  const int shift = __builtin_ctzll(uint64_t(w.block));
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * w.K;
    const uint8_t* q = row_codes(w, n);
    const uint8_t* p = row_positions(w, n);
    const float* sc = row_scales(w, n);
    const uint8_t* zp = row_zeros(w, n);
    for (int64_t win = 0; win < w.K / 32; ++win) {
      const int64_t g = (win * 32) >> shift;
      window(q + code_offset(w, win), p + position_offset(w, win), sc[g], float(zp[g]), ((win * 32) & (w.block - 1)) == 0, row + win * 32);
    }
  }
}
}  // namespace

// One implementation per instruction set, each in its own file: rows [n0, n1) of y, any M.
void gemv_scalar(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_avx2(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_avx512(const Bitmask& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);

void gemv_twofour_scalar(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_twofour_avx2(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_twofour_avx512(const TwoFour& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);

void gemv_int4_scalar(const Int4Dense& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_int4_avx2(const Int4Dense& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_int4_avx512(const Int4Dense& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);

void gemv_twofour_int4_scalar(const TwoFourInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_twofour_int4_avx2(const TwoFourInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_twofour_int4_avx512(const TwoFourInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);

void gemv_bitmask_int4_scalar(const BitmaskInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_bitmask_int4_avx2(const BitmaskInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_bitmask_int4_avx512(const BitmaskInt4& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1);

// Rows of x as 16-bit integers for the 16-bit 4-bit sparse kernels (bitmask_int4_vnni_avx512.cpp,
// twofour_int4_vnni_avx512.cpp): per row m, x[k] ≈ scale[m] · xq with xq = 256 · hi − 32768 + lo (hi, lo
// unsigned bytes, row m at m · ld, ld a multiple of 64 ≥ K; quantize_x16_avx512 writes xq = 0 for the
// inputs from K to ld).
struct X16 {
  uint8_t* hi;
  uint8_t* lo;
  float* scale;
  int64_t ld;
};
void quantize_x16_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, const X16& out);
// Needs w.row_sums and w.block 32 or a multiple of 64; AVX-512 BW, VNNI and VBMI2.
void gemv_bitmask_int4_x16_avx512(const BitmaskInt4& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
// Needs w.row_sums and w.block ≤ 512; AVX-512 BW, VNNI and VBMI.
void gemv_twofour_int4_x16_avx512(const TwoFourInt4& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);

// Int4 weights × int8 activations (AVX-512 VNNI; K % 64 == 0): x quantized first by
// quantize_x_int4 into bytes int8[M][K] laid out per 128 inputs as the kernel reads them, scales and
// float sums per block of 32 (int4_vnni_avx512.cpp).
struct Int4X {
  const int8_t* bytes;
  const float* scales;
  const float* sums;
  int64_t ld;
};
void quantize_x_int4_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* bytes, float* scales, float* sums);
void gemv_int4x_avx512(const Int4Dense& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
// The same on AVX2 (int4_int8x_avx2.cpp; K % 32 == 0, either grid form): x quantized to the same
// values by quantize_x_blocks_avx2 with B = 32, its bytes in input order.
// x[M][K] rounded to int8 per row and block of B inputs (K and B multiples of 32; the last block may be
// shorter): scales[M][ceil(K/B)] = max|x| / 127 (1 for an all-zero block), bytes[M][K] = round(x / scale)
// in [−127, 127] in input order (offset: stored as q + 128, to be read as unsigned), sums[M][ceil(K/B)] the
// blocks' float sums of x.
void quantize_x_blocks_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, int64_t B, bool offset, int8_t* bytes, float* scales, float* sums);
void gemv_int4x_avx2(const Int4Dense& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
// 2:4-int4 × int8 activations on AVX2 (twofour_int4_int8x_avx2.cpp): needs w.nibbles, x quantized by
// quantize_x_blocks_avx2 per block of w.block inputs with the offset (xq.sums unused), n0 even.
void gemv_twofour_int4_int8x_avx2(const TwoFourInt4& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);

// Dense int8 weights × int8 activations (AVX-512 VNNI; w.q.corr set): x quantized first by quantize_x.
void quantize_x_avx512(const float* x, int64_t M, int64_t ldx, int64_t K, uint8_t* u8, float* scales);
void gemv_int8x_avx512(const Bitmask& w, const QuantizedX& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
// The same on AVX2 (int8_int8x_avx2.cpp): a dense int8 weight in blocks of 32 (w.q.corr set), x quantized
// by quantize_x_blocks_avx2 with B = 32, no offset (the sums unused).
void gemv_int8_int8x_avx2(const Bitmask& w, const Int4X& xq, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
// Dense int8 values in blocks of 32 (w.q.row_sums set, K % 64 == 0) × 16-bit activations; AVX-512 VNNI.
void gemv_int8_x16_avx512(const Bitmask& w, const X16& x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);

// Activation-sparse GEMV with the weight input-major (wt: K rows of N): y[n0, n1) = Σ_a vals[a] · wt[idx[a], n0:n1).
void gemv_sparse_x_scalar(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1);
void gemv_sparse_x_avx2(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1);
void gemv_sparse_x_avx512(const float* wt, int64_t N, const int32_t* idx, const float* vals, int64_t count, float* y, int64_t n0, int64_t n1);

// Activation-sparse GEMV with 4-bit weights stored input-major (the input-major twin of Int4Dense,
// for inputs thresholded TEAL-style), one buffer in blocks of 32 inputs, each block 48 · ld bytes:
// its 32 rows of codes (row k: W[0..N)[k], ld bytes, per 32 outputs 16 bytes, byte j with output j in
// its low nibble and output j + 16 in its high one; ld a multiple of 64, ≥ 16 · ceil(N/32), the
// padding codes 0; held line by line, input_codes), then its 2 · ld float scales, then its 2 · ld
// float offsets (padding 0): w[n][k] =
// code · scale + offset of (k/32, n), or with zero_point set (code − offset) · scale. K % 32 == 0.
// Half grid (half set): the scales and offsets are fp16 (Int4Dense's half grid: every value a normal
// fp16 number or zero, widened exactly), each block 40 · ld bytes — a third of the grid bytes a block
// read with every input active, a sixth of it in all.
// Read with every input active, the weight is one sequential stream; an inactive input's row is
// skipped, and so is a block with no active input, scales included. Per active block b the kernels
// form acc[n] = Σ x_k · code[k][n] and xs = Σ x_k over its active inputs, then y[n] += scale · acc +
// offset · xs (zero point: scale · (acc − zero · xs)): the model's result up to float32 rounding.
struct Int4InputMajor {
  int64_t N, K;
  const uint8_t* data;
  int64_t ld;
  bool zero_point = false;
  bool half = false;
  bool int8 = false;  // the int8_activations option: the AVX2 and scalar kernels round the active inputs to int8 (not AVX-512's)
};
namespace {
inline int64_t grid_value_bytes(const Int4InputMajor& w) { return w.half ? 2 : 4; }
inline int64_t block_bytes(const Int4InputMajor& w) { return 32 * w.ld + 4 * w.ld * grid_value_bytes(w); }
// Byte `byte` of input k's row of codes. A block holds its 32 rows line by line: the 64-byte line j
// (outputs 128j .. 128j + 127) of each of its rows in turn, then line j + 1, so a tile of outputs reads
// its active rows from one contiguous 2 KB run of the block and the block is read front to back. With
// rows held whole (a tile's active rows ld bytes apart) the streamed kernel ran 5-15 % slower, relative
// to the row-major 4-bit GEMV, in ad-hoc runs of benchmarks/kernel_throughput.py (not kept).
inline const uint8_t* input_codes(const Int4InputMajor& w, int64_t k, int64_t byte) {
  return w.data + (k >> 5) * block_bytes(w) + (byte >> 6) * 2048 + (k & 31) * 64 + (byte & 63);
}
// A block's scales, and its offsets (2 · ld values each, float or fp16: read them with grid_value).
inline const uint8_t* block_scales(const Int4InputMajor& w, int64_t b) { return w.data + b * block_bytes(w) + 32 * w.ld; }
inline const uint8_t* block_offsets(const Int4InputMajor& w, int64_t b) { return block_scales(w, b) + 2 * w.ld * grid_value_bytes(w); }
// Value n of a block's scales or offsets from g (block_scales, block_offsets, or a point in them).
template <bool HALF>
inline float grid_value(const uint8_t* g, int64_t n) {
  if constexpr (HALF) return half_to_float(reinterpret_cast<const uint16_t*>(g)[n]);
  else return reinterpret_cast<const float*>(g)[n];
}
inline float grid_value(const Int4InputMajor& w, const uint8_t* g, int64_t n) { return w.half ? grid_value<true>(g, n) : grid_value<false>(g, n); }
// How far ahead of the line a tile reads in a row the input-major kernels prefetch: the same row's line
// two tiles of 128 outputs on (two 2 KB runs). 4 KB was faster than 128 B, 2, 8 and 16 KB in ad-hoc
// runs of benchmarks/kernel_throughput.py (not kept).
constexpr int64_t kInt4xAhead = 4096;
// Calls f(half) with a std::bool_constant for the weight's grid form (a kernel's tile template per form).
template <class F>
inline void by_input_major_grid(const Int4InputMajor& w, F f) {
  if (w.half) f(std::true_type{});
  else f(std::false_type{});
}
}  // namespace
// The active inputs of one x, grouped by block of 32: idx/vals in input order, blocks[t] the t-th
// active block and starts[t] .. starts[t + 1] its inputs' range in idx/vals.
struct ActiveInputs {
  const int32_t* idx;
  const float* vals;
  const int32_t* blocks;
  const int64_t* starts;
  int64_t nblocks;
  // int8 activations (null: float): q[p] = round(vals[p] / qs[p]) in [−127, 127], qs[p] = the largest
  // |vals| of p's block / 127 (every input of a block has its block's scale)
  const int8_t* q = nullptr;
  const float* qs = nullptr;
};
namespace {
// The block loop of the input-major 4-bit kernels of every instruction set: out (N rounded up to 32
// floats) zeroed; then for each active block, the sum of its active inputs, its scales and offsets,
// and tile(p0, p1, code byte offset, scales, offsets, sum, chunks, out) for each tile of at most
// `most` 32-output chunks, in order (scales and offsets: the grid bytes at the tile's first output).
template <class Tile>
inline void for_each_block_tile(const Int4InputMajor& w, const ActiveInputs& a, int64_t most, float* out, Tile tile) {
  const int64_t chunks = (w.N + 31) / 32;
  for (int64_t j = 0; j < 32 * chunks; ++j) out[j] = 0.f;
  for (int64_t t = 0; t < a.nblocks; ++t) {
    const int64_t p0 = a.starts[t], p1 = a.starts[t + 1];
    float sum = 0.f;
    for (int64_t p = p0; p < p1; ++p) sum += a.vals[p];
    const uint8_t* s = block_scales(w, a.blocks[t]);
    const uint8_t* o = block_offsets(w, a.blocks[t]);
    for (int64_t c = 0; c < chunks; c += most) {
      const int64_t at = 32 * c, g = at * grid_value_bytes(w);
      tile(p0, p1, at / 2, s + g, o + g, sum, chunks - c < most ? chunks - c : most, out + at);
    }
  }
}
}  // namespace
// The active inputs of one x for the 16-bit kernel (int4_x_vnni_avx512.cpp), per active block t
// (blocks[t]): quads [starts[t], starts[t + 1]) of four inputs each (the last one padded with zero
// activations), quad q's rows rows[4q .. 4q + 3] as byte offsets (k % 32) · 64 of their lines in a
// 2 KB run, its activations rounded to xq = round(x / qs[t]) in [−32639, 32639], qs[t] = the block's
// largest |x| / 32639, split as xq = 256 · xh + xl (xh, xl signed bytes; xh[q] / xl[q] the quad's four,
// row a in the low byte); sums[t] = Σ x of the block (float, in input order).
struct ActiveQuads {
  const int32_t* blocks;
  const int64_t* starts;
  const int32_t* rows;
  const int32_t* xh;
  const int32_t* xl;
  const float* qs;
  const float* sums;
  int64_t nblocks;
};
// out[0, N) = Σ over the quads' inputs (out holds N rounded up to 32 floats). AVX-512 VNNI.
void gemv_int4_x_i16_avx512(const Int4InputMajor& w, const ActiveQuads& a, float* out);
// out[0, N) = the active inputs' part of y (out holds N rounded up to 32 floats).
void gemv_int4_x_scalar(const Int4InputMajor& w, const ActiveInputs& a, float* out);
void gemv_int4_x_avx2(const Int4InputMajor& w, const ActiveInputs& a, float* out);
void gemv_int4_x_avx512(const Int4InputMajor& w, const ActiveInputs& a, float* out);
// The same with int8 activations (a.q, a.qs): per block, Σ code · q in integers, times scale · qs, plus
// offset · Σ vals (the float sum), as the row-major int4 × int8 kernels do.
void gemv_int4_x_int8_scalar(const Int4InputMajor& w, const ActiveInputs& a, float* out);
void gemv_int4_x_int8_avx2(const Int4InputMajor& w, const ActiveInputs& a, float* out);
// Wᵀ rows [k0, k1) of outputs [n0, n1) (n0 % 32 == 0) into out[(k1 − k0)][ldo] (the prefill path: a
// tile of the input-major weight decompressed, then one GEMM).
void decompress_int4_x_scalar(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo);
void decompress_int4_x_avx2(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo);
void decompress_int4_x_avx512(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo);
namespace {
// The row loop of those decompressions: for each input k in [k0, k1), chunk(codes, scales, offsets,
// dst) for each whole 32-output chunk of its row in order (the pointers at that chunk; scales and
// offsets the grid bytes), and the scalar path for a last partial chunk.
template <class Chunk>
inline void for_each_decompress_chunk(const Int4InputMajor& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out, int64_t ldo, Chunk chunk) {
  const int64_t full = (n1 - n0) / 32, vb = grid_value_bytes(w);
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* s = block_scales(w, k / 32) + n0 * vb;
    const uint8_t* o = block_offsets(w, k / 32) + n0 * vb;
    float* dst = out + (k - k0) * ldo;
    for (int64_t c = 0; c < full; ++c) chunk(input_codes(w, k, n0 / 2 + 16 * c), s + 32 * c * vb, o + 32 * c * vb, dst + 32 * c);
    if (full * 32 < n1 - n0) decompress_int4_x_scalar(w, k, k + 1, n0 + 32 * full, n1, dst + 32 * full, ldo);
  }
}
}  // namespace

// Decode-step operations (layer_ops.cpp, AVX2 + FMA).
void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out);
void rope(float* v, int64_t heads, int64_t d, const float* cos, const float* sin);
void attention_head(const float* q, const float* kc, const float* vc, int64_t n, int64_t d, float scale, float* out, float* scores);
void silu_mul(const float* g, const float* u, int64_t n, float* out);
// CATS: act[i] = SiLU(g[i]) where |SiLU(g[i])| > threshold, else 0; the active i (plus base) listed in
// rows (n entries of room). Returns how many are active.
int64_t silu_active(const float* g, int64_t n, double threshold, float* act, int32_t* rows, int32_t base);
double topk_threshold(const float* x, int64_t K, int64_t keep);

// Rows [n0, n1) of W written dense into out[(n1-n0)][K] (the prefill path decompresses tile by tile).
void decompress(const Bitmask& w, int64_t n0, int64_t n1, float* out);
void decompress(const TwoFour& w, int64_t n0, int64_t n1, float* out);
void decompress_avx512(const Bitmask& w, int64_t n0, int64_t n1, float* out);
void decompress_avx512(const TwoFour& w, int64_t n0, int64_t n1, float* out);
void decompress(const Int4Dense& w, int64_t n0, int64_t n1, float* out);
void decompress(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out);
void decompress_avx512(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out);
void decompress(const BitmaskInt4& w, int64_t n0, int64_t n1, float* out);
void decompress_avx512(const BitmaskInt4& w, int64_t n0, int64_t n1, float* out);
void decompress_avx512(const Int4Dense& w, int64_t n0, int64_t n1, float* out);
void decompress_avx2(const Int4Dense& w, int64_t n0, int64_t n1, float* out);
void decompress_avx2(const TwoFour& w, int64_t n0, int64_t n1, float* out);
void decompress_avx2(const Bitmask& w, int64_t n0, int64_t n1, float* out);
void decompress_avx2(const TwoFourInt4& w, int64_t n0, int64_t n1, float* out);
void decompress_avx2(const BitmaskInt4& w, int64_t n0, int64_t n1, float* out);

}  // namespace pk
