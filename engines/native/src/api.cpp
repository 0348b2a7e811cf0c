// The library's C ABI: runtime instruction-set dispatch, a small persistent thread pool, and the
// entry points the Python side (engines/native) calls through ctypes. No global state other than
// the chosen instruction set and the pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  // (F16C: the fp16 grids' conversion; every AVX2 + FMA CPU has it)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return kAvx2;
  return kScalar;
}

const int g_best = detect_isa();
std::atomic<int> g_isa{g_best};

bool detect_vnni() {
  __builtin_cpu_init();
  return g_best == kAvx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
const bool g_vnni = detect_vnni();
// the bitmask-int4 × 16-bit kernel's byte expansion (vpexpandb) as well
bool detect_vbmi2() {
  __builtin_cpu_init();
  return g_vnni && __builtin_cpu_supports("avx512vbmi2");
}
const bool g_vbmi2 = detect_vbmi2();
// the 2:4-int4 × 16-bit kernel's byte permutations (vpermb, vpmultishiftqb)
bool detect_vbmi() {
  __builtin_cpu_init();
  return g_vnni && __builtin_cpu_supports("avx512vbmi");
}
const bool g_vbmi = detect_vbmi();
std::atomic<bool> g_x16{true};  // input-major 4-bit weights × 16-bit activations where the CPU has AVX-512 VNNI (tests switch it off)
std::atomic<bool> g_int8x{true};  // int8 activations where a weight allows them (tests switch it off)

// A pool of (threads - 1) workers plus the calling thread. A job is `ntasks` calls of fn(ctx, i);
// a task index is claimed by a CAS on one 64-bit word holding (generation << 32 | next index), so a
// worker that wakes late can never claim a task of a later job. Workers spin briefly between jobs
// (decode calls the kernels back to back) and then sleep on a condition variable.
class Pool {
 public:
  using Fn = void (*)(void*, int64_t);

  explicit Pool(int threads) { resize(threads); }
  ~Pool() { stop_workers(); }

  int threads() const { return int(workers_.size()) + 1; }

  // How long an idle worker spins before it sleeps: long enough to bridge the host's work between
  // two kernel calls of a decode step, short enough not to steal a core from another runtime's
  // threads (the prefill's GEMM) for long.
  std::atomic<int> spin_us{50};

  void resize(int threads) {
    threads = std::max(1, threads);
    if (threads == this->threads() && !workers_.empty()) return;
    stop_workers();
    stop_ = false;
    for (int i = 0; i < threads - 1; ++i) workers_.emplace_back([this] { work(); });
  }

  void run(int64_t ntasks, Fn fn, void* ctx) {
    if (ntasks <= 0) return;
    if (workers_.empty() || ntasks == 1) {
      for (int64_t i = 0; i < ntasks; ++i) fn(ctx, i);
      return;
    }
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one job at a time (callers on several threads queue here)
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      ctx_ = ctx;
      ntasks_ = ntasks;
      completed_.store(0, std::memory_order_relaxed);
      gen_ += 1;
      claim_.store(uint64_t(gen_) << 32, std::memory_order_release);
    }
    cv_.notify_all();
    drain(gen_, fn, ctx, ntasks);
    while (completed_.load(std::memory_order_acquire) < ntasks) _mm_pause();
  }

 private:
  void drain(uint32_t gen, Fn fn, void* ctx, int64_t ntasks) {
    for (;;) {
      uint64_t cur = claim_.load(std::memory_order_acquire);
      if (uint32_t(cur >> 32) != gen) return;
      const int64_t i = int64_t(cur & 0xFFFFFFFFu);
      if (i >= ntasks) return;
      if (!claim_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) continue;
      fn(ctx, i);
      completed_.fetch_add(1, std::memory_order_release);
    }
  }

  void work() {
    uint32_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us.load(std::memory_order_relaxed));
      while (published_gen() == seen && !stop_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < until) _mm_pause();
      Fn fn;
      void* ctx;
      int64_t ntasks;
      uint32_t gen;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen || stop_.load(); });
        if (stop_.load()) return;
        fn = fn_;
        ctx = ctx_;
        ntasks = ntasks_;
        gen = gen_;
      }
      seen = gen;
      drain(gen, fn, ctx, ntasks);
    }
  }

  uint32_t published_gen() const { return uint32_t(claim_.load(std::memory_order_acquire) >> 32); }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, job_mu_;
  std::condition_variable cv_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> completed_{0};
  uint32_t gen_ = 0;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t ntasks_ = 0;
};

Pool& pool() {
  static Pool p(int(std::max(1u, std::thread::hardware_concurrency())));
  return p;
}

constexpr int64_t kRowsPerTask = 16;

// A GEMV's output rows split into one contiguous range per thread (a multiple of 4 rows each), so each
// core streams its own rows front to back and a kernel's prefetch of the rows ahead fetches rows the
// same core will read (tasks of 16 rows taken in turn by the threads sent every prefetch into the
// other core's next task).
#ifndef PK_GEMV_PARTS
#define PK_GEMV_PARTS 1
#endif
inline int64_t gemv_tasks(int64_t N) {
  const int64_t tasks = int64_t(pool().threads()) * PK_GEMV_PARTS;
  return std::max<int64_t>(1, std::min(tasks, (N + kRowsPerTask - 1) / kRowsPerTask));
}
inline void task_rows(int64_t N, int64_t tasks, int64_t i, int64_t& n0, int64_t& n1) {
  const int64_t per = ((N + tasks - 1) / tasks + 3) / 4 * 4;
  n0 = std::min(N, i * per);
  n1 = std::min(N, n0 + per);
}

inline int64_t sparse_x_columns(int64_t N) {
  // one contiguous column range per thread (rounded to 128 columns): long row streams
  const int64_t t = pool().threads();
  return ((N + t - 1) / t + 127) / 128 * 128;
}


// Each weight kind's kernels, one per instruction set.
template <class W>
struct Kernels;
#define PK_KERNELS(W, scalar_, avx2_, avx512_)                                                                     \
  template <>                                                                                                     \
  struct Kernels<W> {                                                                                             \
    static constexpr void (*scalar)(const W&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t) = scalar_; \
    static constexpr void (*avx2)(const W&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t) = avx2_;     \
    static constexpr void (*avx512)(const W&, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t) = avx512_; \
  };
PK_KERNELS(pk::Bitmask, pk::gemv_scalar, pk::gemv_avx2, pk::gemv_avx512)
PK_KERNELS(pk::TwoFour, pk::gemv_twofour_scalar, pk::gemv_twofour_avx2, pk::gemv_twofour_avx512)
PK_KERNELS(pk::TwoFourInt4, pk::gemv_twofour_int4_scalar, pk::gemv_twofour_int4_avx2, pk::gemv_twofour_int4_avx512)
PK_KERNELS(pk::BitmaskInt4, pk::gemv_bitmask_int4_scalar, pk::gemv_bitmask_int4_avx2, pk::gemv_bitmask_int4_avx512)
PK_KERNELS(pk::Int4Dense, pk::gemv_int4_scalar, pk::gemv_int4_avx2, pk::gemv_int4_avx512)
#undef PK_KERNELS

// Calls the chosen instruction set's one of three functions with the same arguments.
template <class F512, class F2, class F1, class... A>
inline void on_isa(int isa, F512 avx512, F2 avx2, F1 scalar, const A&... a) {
  if (isa == kAvx512) avx512(a...);
  else if (isa == kAvx2) avx2(a...);
  else scalar(a...);
}

// M rows of x through one weight, output rows [n0, n1), on the chosen instruction set.
template <class W>
inline void gemv_rows(const W& w, const float* x, int64_t M, float* y, int isa, int64_t n0, int64_t n1) {
  on_isa(isa, Kernels<W>::avx512, Kernels<W>::avx2, Kernels<W>::scalar, w, x, M, w.K, y, w.N, n0, n1);
}

template <class W>
struct GemvJob {
  const W* w;
  const float* x;
  int64_t M;
  float* y;
  int isa;
  int64_t tasks;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<GemvJob*>(p);
    int64_t n0, n1;
    task_rows(j->w->N, j->tasks, i, n0, n1);
    if (n0 < n1) gemv_rows(*j->w, j->x, j->M, j->y, j->isa, n0, n1);
  }
};

template <class W>
void gemv(const W& w, const float* x, int64_t M, float* y, int isa) {
  GemvJob<W> job{&w, x, M, y, isa, gemv_tasks(w.N)};
  pool().run(job.tasks, &GemvJob<W>::task, &job);
}

// M rows of x, prepared once (quantized: X), through a weight by one kernel F, output rows split over the pool.
template <class W, class X, void (*F)(const W&, const X&, int64_t, float*, int64_t, int64_t, int64_t)>
struct PreparedJob {
  const W* w;
  X xq;
  int64_t M;
  float* y;
  int64_t tasks;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<PreparedJob*>(p);
    int64_t n0, n1;
    task_rows(j->w->N, j->tasks, i, n0, n1);
    if (n0 < n1) F(*j->w, j->xq, j->M, j->y, j->w->N, n0, n1);
  }
  void run() { pool().run(tasks, &PreparedJob::task, this); }
};
using Int8xJob = PreparedJob<pk::Bitmask, pk::QuantizedX, pk::gemv_int8x_avx512>;
using BitmaskInt4x16Job = PreparedJob<pk::BitmaskInt4, pk::X16, pk::gemv_bitmask_int4_x16_avx512>;
using TwoFourInt4x16Job = PreparedJob<pk::TwoFourInt4, pk::X16, pk::gemv_twofour_int4_x16_avx512>;
using Int8x16Job = PreparedJob<pk::Bitmask, pk::X16, pk::gemv_int8_x16_avx512>;
using Int8xAvx2Job = PreparedJob<pk::Bitmask, pk::Int4X, pk::gemv_int8_int8x_avx2>;

// Rows of x as the 16-bit kernels read them (pk::X16), in buffers of this thread, rows K rounded up to
// 64 inputs apart (both kernels read whole 64-input steps).
pk::X16 x16_of(const float* x, int64_t M, int64_t K) {
  thread_local std::vector<uint8_t> bytes;
  thread_local std::vector<float> scales;
  const int64_t ld = (K + 63) / 64 * 64;
  bytes.resize(size_t(2 * M * ld));
  scales.resize(size_t(M));
  const pk::X16 xq{bytes.data(), bytes.data() + M * ld, scales.data(), ld};
  pk::quantize_x16_avx512(x, M, K, K, xq);
  return xq;
}

// Rows of x rounded to int8 per block of B inputs (pk::Int4X: q in input order, a scale and the float sum
// of x per row and block), in buffers of this thread: by quantize_x_int4_avx512 (B = 32) on AVX-512, else
// by quantize_x_blocks_avx2 (offset: stored as q + 128).
pk::Int4X int8_rows_of(const float* x, int64_t M, int64_t K, int64_t B, bool offset, bool avx512) {
  thread_local std::vector<int8_t> bytes;
  thread_local std::vector<float> scales, sums;
  const int64_t nb = (K + B - 1) / B;
  bytes.resize(size_t(M * K));
  scales.resize(size_t(M * nb));
  sums.resize(size_t(M * nb));
  if (avx512) pk::quantize_x_int4_avx512(x, M, K, K, bytes.data(), scales.data(), sums.data());
  else pk::quantize_x_blocks_avx2(x, M, K, K, B, offset, bytes.data(), scales.data(), sums.data());
  return {bytes.data(), scales.data(), sums.data(), K};
}

// Whether a dense int8 weight runs the 16-bit kernel (vnni_avx512.cpp, gemv_int8_x16_avx512): AVX-512
// chosen on a CPU with VNNI, the 16-bit switch on, the weight's row sums given, blocks of 32, K % 64 == 0.
bool int8_x16(const pk::Bitmask& w, int isa) {
  return !w.masks && w.q.values && w.q.row_sums && w.q.block == 32 && w.K % 64 == 0 && isa == kAvx512 && g_vnni && g_x16.load(std::memory_order_relaxed);
}

// A bitmask/dense weight: int8 activations by the VNNI kernel where the weight allows them
// (w.q.corr, accuracy_level 4 or the int8_activations option) and the chosen instruction set is AVX-512
// on a CPU with VNNI, by the AVX2 kernel (dense, blocks of 32) where it is AVX2; else
// 16-bit activations where int8_x16 says so; else the float kernels.
void gemv(const pk::Bitmask& w, const float* x, int64_t M, float* y, int isa) {
  if (w.q.corr && g_vnni && isa == kAvx512 && g_int8x.load(std::memory_order_relaxed)) {
    thread_local std::vector<uint8_t> u8;
    thread_local std::vector<float> scales;
    u8.resize(size_t(M * w.K));
    scales.resize(size_t(M * (w.K / 32)));
    pk::quantize_x_avx512(x, M, w.K, w.K, u8.data(), scales.data());
    Int8xJob job{&w, {u8.data(), scales.data(), w.K}, M, y, gemv_tasks(w.N)};
    pool().run(job.tasks, &Int8xJob::task, &job);
    return;
  }
  if (w.q.corr && isa == kAvx2 && g_int8x.load(std::memory_order_relaxed)) {
    Int8xAvx2Job{&w, int8_rows_of(x, M, w.K, 32, false, false), M, y, gemv_tasks(w.N)}.run();
    return;
  }
  if (int8_x16(w, isa)) {
    Int8x16Job{&w, x16_of(x, M, w.K), M, y, gemv_tasks(w.N)}.run();
    return;
  }
  gemv<pk::Bitmask>(w, x, M, y, isa);
}

// Whether a bitmask-int4 weight runs the 16-bit kernel (bitmask_int4_vnni_avx512.cpp): AVX-512 chosen on
// a CPU with VNNI and VBMI2, the 16-bit switch on (pk_int16_activations), the weight's row sums
// given and its grid blocks 32 inputs or whole groups of 64.
bool bitmask_int4_x16(int64_t block, int isa) {
  return isa == kAvx512 && g_vbmi2 && g_x16.load(std::memory_order_relaxed) && (block == 32 || (block > 0 && block % pk::kBitmaskInt4Group == 0));
}

void gemv(const pk::BitmaskInt4& w, const float* x, int64_t M, float* y, int isa) {
  if (!w.row_sums || !bitmask_int4_x16(w.block, isa)) {
    gemv<pk::BitmaskInt4>(w, x, M, y, isa);
    return;
  }
  BitmaskInt4x16Job{&w, x16_of(x, M, w.K), M, y, gemv_tasks(w.N)}.run();
}

// Whether a 2:4-int4 weight runs the 16-bit kernel (twofour_int4_vnni_avx512.cpp): AVX-512 chosen on a
// CPU with VNNI and VBMI, the 16-bit switch on, the weight's row sums given and its grid blocks at most
// 512 inputs (so each block's integer sums stay below 2^24, exact in float).
bool twofour_int4_x16(int64_t block, int isa) {
  return isa == kAvx512 && g_vbmi && g_x16.load(std::memory_order_relaxed) && block >= 32 && block <= 512;
}

using TwoFourInt4xJob = PreparedJob<pk::TwoFourInt4, pk::Int4X, pk::gemv_twofour_int4_int8x_avx2>;

// Whether a 2:4-int4 weight runs the int8-activation AVX2 kernel (twofour_int4_int8x_avx2.cpp): its
// nibble layout given (the host's int8_activations option), AVX2 chosen, the int8 switch on.
bool twofour_int4_int8x(const pk::TwoFourInt4& w, int isa) {
  return w.nibbles && isa == kAvx2 && g_int8x.load(std::memory_order_relaxed);
}

void gemv(const pk::TwoFourInt4& w, const float* x, int64_t M, float* y, int isa) {
  if (twofour_int4_int8x(w, isa)) {
    TwoFourInt4xJob{&w, int8_rows_of(x, M, w.K, w.block, true, false), M, y, gemv_tasks(w.N)}.run();
    return;
  }
  if (!w.row_sums || !w.paired || !twofour_int4_x16(w.block, isa)) {  // the 16-bit kernel reads the paired layout only
    gemv<pk::TwoFourInt4>(w, x, M, y, isa);
    return;
  }
  TwoFourInt4x16Job{&w, x16_of(x, M, w.K), M, y, gemv_tasks(w.N)}.run();
}

struct Int4xJob {
  const pk::Int4Dense* w;
  pk::Int4X xq;
  int64_t M;
  float* y;
  int64_t tasks;
  bool avx512;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<Int4xJob*>(p);
    int64_t n0, n1;
    task_rows(j->w->N, j->tasks, i, n0, n1);
    if (n0 >= n1) return;
    if (j->avx512) pk::gemv_int4x_avx512(*j->w, j->xq, j->M, j->y, j->w->N, n0, n1);
    else pk::gemv_int4x_avx2(*j->w, j->xq, j->M, j->y, j->w->N, n0, n1);
  }
};

// Whether an int4 weight asked for int8 activations (the int8_activations option) gets them: by the
// VNNI kernel where the chosen instruction set is AVX-512 on a CPU with VNNI (float grids, K % 64 ==
// 0), by the AVX2 kernel where it is AVX2; else the weight runs with fp32 activations.
bool int4_int8x(const pk::Int4Dense& w, int isa) {
  if (!g_int8x.load(std::memory_order_relaxed)) return false;
  if (isa == kAvx512) return g_vnni && !w.half && w.K % 64 == 0;
  return isa == kAvx2;
}

void gemv_int4(const pk::Int4Dense& w, const float* x, int64_t M, float* y, int isa, bool int8x) {
  if (int8x && int4_int8x(w, isa)) {
    const bool avx512 = isa == kAvx512;
    Int4xJob job{&w, int8_rows_of(x, M, w.K, pk::kInt4Block, false, avx512), M, y, gemv_tasks(w.N), avx512};
    pool().run(job.tasks, &Int4xJob::task, &job);
    return;
  }
  gemv<pk::Int4Dense>(w, x, M, y, isa);
}

template <class W>
struct DecompressJob {
  const W* w;
  int64_t n0, n1;
  float* out;
  int isa;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<DecompressJob<W>*>(p);
    const int64_t a = j->n0 + i * kRowsPerTask, b = std::min(j->n1, a + kRowsPerTask);
    float* dst = j->out + (a - j->n0) * j->w->K;
    if (j->isa == kAvx512) pk::decompress_avx512(*j->w, a, b, dst);
    else if (j->isa == kAvx2) pk::decompress_avx2(*j->w, a, b, dst);
    else pk::decompress(*j->w, a, b, dst);
  }
};

struct SparseXJob {
  const float* wt;
  int64_t N;
  const int32_t* idx;
  const float* vals;
  int64_t count;
  float* y;
  int64_t cols;
  int isa;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<SparseXJob*>(p);
    const int64_t n0 = i * j->cols, n1 = std::min(j->N, n0 + j->cols);
    on_isa(j->isa, pk::gemv_sparse_x_avx512, pk::gemv_sparse_x_avx2, pk::gemv_sparse_x_scalar, j->wt, j->N, j->idx, j->vals, j->count, j->y, n0, n1);
  }
};

// The active inputs of x (|x_k| > threshold; threshold < 0: all) grouped by block of 32, in buffers
// of the calling thread. Returns how many inputs are active.
struct Active {
  std::vector<int32_t> idx, blocks;
  std::vector<float> vals, qs;
  std::vector<int64_t> starts;
  std::vector<int8_t> q;
  pk::ActiveInputs view() const {
    return {idx.data(), vals.data(), blocks.data(), starts.data(), int64_t(blocks.size()), q.empty() ? nullptr : q.data(), q.empty() ? nullptr : qs.data()};
  }
};
int64_t find_active(const float* x, int64_t K, double threshold, Active& a) {
  a.idx.resize(size_t(K));
  a.vals.resize(size_t(K));
  a.blocks.clear();
  a.starts.clear();
  int64_t count = 0;
  for (int64_t b0 = 0; b0 < K; b0 += 32) {  // branch-free within a block: every input written, the active ones kept
    const int64_t start = count, b1 = std::min(K, b0 + 32);
    for (int64_t k = b0; k < b1; ++k) {
      a.idx[size_t(count)] = int32_t(k);
      a.vals[size_t(count)] = x[k];
      count += std::fabs(double(x[k])) > threshold ? 1 : 0;  // (threshold < 0: every input)
    }
    if (count > start) {
      a.blocks.push_back(int32_t(b0 / 32));
      a.starts.push_back(start);
    }
  }
  a.starts.push_back(count);
  a.q.clear();
  return count;
}

// x · inv rounded to the nearest integer (ties to even) within [−most, most] — by adding and taking
// away 1.5 · 2^23 (exact for |x · inv| < 2^22 without -ffast-math, which build.sh never uses), so that
// loops over it vectorize, where std::nearbyint is a library call per value. round_int8: x rounded to
// int8 as the int4 × int8 kernels round a block of it (quantize_x_int4_*).
inline float round_within(float x, float inv, float most) {
  constexpr float kMagic = 12582912.f;
  return std::min(most, std::max(-most, (x * inv + kMagic) - kMagic));
}
inline float round_int8(float x, float inv) { return round_within(x, inv, 127.f); }
// A block's scale: its largest |x| / 127 (1 for an all-zero block).
inline float int8_scale(float amax) { return amax > 0.f ? amax / 127.f : 1.f; }

// The active inputs rounded to int8 per block as the int4 × int8 kernels round x (quantize_x_int4_*):
// scale = the block's largest |x| / 127, q = round to nearest even of x · (1 / scale), in [−127, 127].
void quantize_active(Active& a) {
  const int64_t count = a.starts.back();
  a.q.resize(size_t(count));
  a.qs.resize(size_t(count));
  for (size_t t = 0; t + 1 < a.starts.size(); ++t) {
    const int64_t p0 = a.starts[t], p1 = a.starts[t + 1];
    float amax = 0.f;
    for (int64_t p = p0; p < p1; ++p) amax = std::max(amax, std::fabs(a.vals[size_t(p)]));
    const float s = int8_scale(amax), inv = 1.f / s;
    for (int64_t p = p0; p < p1; ++p) {
      a.q[size_t(p)] = int8_t(round_int8(a.vals[size_t(p)], inv));
      a.qs[size_t(p)] = s;
    }
  }
}

// The active inputs in quads for the 16-bit kernel (pk::ActiveQuads): per active block its largest |x|
// sets qs, each input is rounded to xq = round(x / qs) (to nearest even, as round_int8, in [−32639,
// 32639]) and split into bytes xh = floor((xq + 128) / 256), xl = xq − 256 · xh; a last quad short of
// four inputs repeats the block's first row with zero activations.
struct Quads {
  std::vector<int32_t> rows, xh, xl;
  std::vector<int64_t> starts;
  std::vector<float> qs, sums;
};
constexpr float kX16 = 32639.f;  // 127 · 256 + 127: xh stays within a signed byte
void make_quads(const Active& a, Quads& qd) {
  const int64_t nb = int64_t(a.blocks.size()), count = a.starts.back();
  const int64_t most = count / 4 + nb;
  qd.rows.resize(size_t(4 * most));
  qd.xh.resize(size_t(most));
  qd.xl.resize(size_t(most));
  qd.starts.resize(size_t(nb + 1));
  qd.qs.resize(size_t(nb));
  qd.sums.resize(size_t(nb));
  int64_t q = 0;
  for (int64_t t = 0; t < nb; ++t) {
    const int64_t p0 = a.starts[size_t(t)], p1 = a.starts[size_t(t + 1)];
    float amax = 0.f, sum = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      amax = std::max(amax, std::fabs(a.vals[size_t(p)]));
      sum += a.vals[size_t(p)];
    }
    const float s = amax > 0.f ? amax / kX16 : 1.f, inv = 1.f / s;
    qd.qs[size_t(t)] = s;
    qd.sums[size_t(t)] = sum;
    qd.starts[size_t(t)] = q;
    for (int64_t p = p0; p < p1; p += 4, ++q) {
      uint32_t h = 0, l = 0;
      for (int64_t j = 0; j < 4; ++j) {
        int32_t xq = 0, row = (a.idx[size_t(p0)] & 31) * 64;
        if (p + j < p1) {
          xq = int32_t(round_within(a.vals[size_t(p + j)], inv, kX16));
          row = (a.idx[size_t(p + j)] & 31) * 64;
        }
        const int32_t xh = (xq + 128) >> 8, xl = xq - 256 * xh;
        h |= uint32_t(uint8_t(int8_t(xh))) << (8 * j);
        l |= uint32_t(uint8_t(int8_t(xl))) << (8 * j);
        qd.rows[size_t(4 * q + j)] = row;
      }
      qd.xh[size_t(q)] = int32_t(h);
      qd.xl[size_t(q)] = int32_t(l);
    }
  }
  qd.starts[size_t(nb)] = q;
}

// Input-major 4-bit: each task owns a run of active blocks (about as many active inputs as the
// others) and every output, so it streams whole rows (a block's rows are contiguous: one sequential
// run when most of its inputs are active); its partial sums go to its own buffer, added up after.
struct Int4InputMajorJob {
  const pk::Int4InputMajor* w;
  pk::ActiveInputs a;
  const Quads* quads;  // the 16-bit kernel's form of a (null: the float or int8 kernels)
  const int64_t* cuts;  // task i: active blocks [cuts[i], cuts[i + 1])
  float* partial;       // tasks × padded N
  int64_t padded;
  int isa;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<Int4InputMajorJob*>(p);
    const pk::ActiveInputs a{j->a.idx, j->a.vals, j->a.blocks + j->cuts[i], j->a.starts + j->cuts[i], j->cuts[i + 1] - j->cuts[i], j->a.q, j->a.qs};
    float* out = j->partial + i * j->padded;
    if (j->quads) {
      const Quads& qd = *j->quads;
      const int64_t t0 = j->cuts[i];
      pk::gemv_int4_x_i16_avx512(*j->w, pk::ActiveQuads{a.blocks, qd.starts.data() + t0, qd.rows.data(), qd.xh.data(), qd.xl.data(), qd.qs.data() + t0,
                                                        qd.sums.data() + t0, a.nblocks},
                                 out);
    } else if (a.q) on_isa(j->isa, pk::gemv_int4_x_int8_avx2, pk::gemv_int4_x_int8_avx2, pk::gemv_int4_x_int8_scalar, *j->w, a, out);
    else on_isa(j->isa, pk::gemv_int4_x_avx512, pk::gemv_int4_x_avx2, pk::gemv_int4_x_scalar, *j->w, a, out);
  }
};

int64_t gemv_int4_x(const pk::Int4InputMajor& w, const float* x, double threshold, float* y, int isa) {
  thread_local Active a;
  thread_local std::vector<float> partial;
  thread_local std::vector<int64_t> cuts;
  const int64_t used = find_active(x, w.K, threshold, a);
  thread_local Quads quads;
  const bool x16 = isa == kAvx512 && g_vnni && g_x16.load(std::memory_order_relaxed);
  if (x16) make_quads(a, quads);
  else if (w.int8 && isa != kAvx512) quantize_active(a);  // (AVX-512 without VNNI runs its float kernel)
  const int64_t nb = int64_t(a.blocks.size());
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool().threads(), nb));
  cuts.assign(size_t(tasks + 1), nb);
  cuts[0] = 0;
  for (int64_t i = 1, t = 0; i < tasks; ++i) {  // the first block whose inputs start at or after i/tasks of them
    while (t < nb && a.starts[size_t(t)] * tasks < used * i) ++t;
    cuts[size_t(i)] = t;
  }
  const int64_t padded = (w.N + 31) / 32 * 32;
  partial.resize(size_t(tasks * padded));
  Int4InputMajorJob job{&w, a.view(), x16 ? &quads : nullptr, cuts.data(), partial.data(), padded, isa};
  pool().run(tasks, &Int4InputMajorJob::task, &job);
  std::memcpy(y, partial.data(), size_t(w.N) * sizeof(float));
  for (int64_t i = 1; i < tasks; ++i)
    for (int64_t n = 0; n < w.N; ++n) y[n] += partial[size_t(i * padded + n)];
  return used;
}

struct Int4InputMajorDecompressJob {
  const pk::Int4InputMajor* w;
  int64_t k0, k1;
  float* out;
  int isa;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<Int4InputMajorDecompressJob*>(p);
    const int64_t a = j->k0 + i * 32, b = std::min(j->k1, a + 32);
    float* dst = j->out + (a - j->k0) * j->w->N;
    on_isa(j->isa, pk::decompress_int4_x_avx512, pk::decompress_int4_x_avx2, pk::decompress_int4_x_scalar, *j->w, a, b, int64_t(0), j->w->N, dst,
           j->w->N);
  }
};

// --- one decode step through every layer (the native engine's decoder) ---------------------------

// A layer's linear as the decoder holds it. kind 0: bitmask or dense (a = masks or null, b = values,
// c = row offsets or null); kind 1: 2:4 (a = values, b = positions); kind 2: input-major dense
// (a = Wᵀ, K rows of N) with an activation threshold (< 0: none). With `scales` set (kinds 0 and 1)
// the values are int8 codes with a scale per row and block of `block` inputs (kind 0: d = the rows'
// sums of their values for the 16-bit kernel, or null). kind 3: 4-bit dense
// (a = codes, b = scales, c = offsets or zero points, block: bit 0 the zero-point form, bit 1 a half
// grid; pk::Int4Dense); kind 4: the same with int8 activations; kind 5: 2:4 with 4-bit values (a = codes,
// b = positions, c = uint8 zero points, scales, block, corr = the rows' sums of their values for the
// 16-bit kernel, layout 1: the paired layout, d = the nibble layout for the int8-activation AVX2 kernel
// or null; pk::TwoFourInt4); kind 6: bitmask with 4-bit
// values (a = masks, b = codes, c = row offsets, d = uint8 zero points, scales, block, corr = the rows'
// sums of their values for the 16-bit kernel; pk::BitmaskInt4);
// kind 7: input-major 4-bit (a = the buffer, stride = ld, block: bit 0 the zero-point form, bit 1 a
// half grid, bit 2 int8 activations; pk::Int4InputMajor) with an activation threshold (< 0: none).
// keep (kinds 2 and 7): > 0, the top-k form — each call keeps the keep largest |x| (topk_threshold)
// instead of the fixed threshold.
struct PkWeight {
  int64_t kind, N, K;
  const void* a;
  const void* b;
  const void* c;
  double threshold;
  const float* scales;
  int64_t block;
  const float* corr;  // int8 activations allowed (see pk::Int8Values)
  const void* d;
  int64_t stride;  // kinds 3-5: the row stride of interleaved arrays (pk::Int4Dense, pk::TwoFourInt4), 0: separate
  int64_t keep;
  int64_t layout;  // kind 5: 1 the paired layout (pk::TwoFourInt4::paired), 0 rows interleaved or separate
};

// Float values, or int8 codes when scales are given.
inline const float* float_values(const void* values, const float* scales) { return scales ? nullptr : static_cast<const float*>(values); }
inline pk::Int8Values int8_values(const void* values, const float* scales, int64_t block, const float* corr = nullptr, const void* row_sums = nullptr) {
  if (!scales) return {};
  return {static_cast<const int8_t*>(values), scales, block, corr, static_cast<const float*>(row_sums)};
}

struct PkLayer {
  int64_t heads, kv_heads, head_dim, ffn;
  const float* attn_norm;
  const float* mlp_norm;
  const float* qkv_bias;  // or null
  PkWeight qkv, o, gate_up, down;
  float* k_cache;  // kv_heads × capacity × head_dim
  float* v_cache;
  int64_t capacity;
  // CATS (>= 0): gate activations with |SiLU(g)| at or below it are zero; for a 4-bit gate_up (kinds 3
  // and 4) only the up rows of the others are computed, and down (input-major, threshold 0) reads only
  // their inputs. < 0: none.
  double gate_threshold;
};

// Attention for T positions p0 .. p0 + T - 1 (a decode step: T = 1; a prefill: p0 = 0): q (T × heads × d)
// and k (T × kv_heads × d) rotated in place by the rotary rows cos/sin (T × d each, row t for position
// p0 + t), k and v written into the caches (kv_heads × capacity × d) at those positions, then out
// (T × heads × d) = causal softmax(q·kᵀ / √d)·v, each query by attention_head over the keys up to its
// position. Tasks: a head and a run of up to 16 queries each. The caller checks p0 + T <= capacity.
void attend(int64_t T, int64_t p0, int64_t heads, int64_t kv_heads, int64_t d, float* q, float* k, const float* v, const float* cos,
            const float* sin, float* k_cache, float* v_cache, int64_t capacity, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    pk::rope(q + t * heads * d, heads, d, cos + t * d, sin + t * d);
    pk::rope(k + t * kv_heads * d, kv_heads, d, cos + t * d, sin + t * d);
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::memcpy(k_cache + (g * capacity + p0 + t) * d, k + (t * kv_heads + g) * d, size_t(d) * sizeof(float));
      std::memcpy(v_cache + (g * capacity + p0 + t) * d, v + (t * kv_heads + g) * d, size_t(d) * sizeof(float));
    }
  }
  struct Job {
    int64_t T, p0, heads, group, d, capacity, chunk;
    const float *q, *kc, *vc;
    float* out;
    float scale;
    static void task(void* p, int64_t i) {
      auto* j = static_cast<Job*>(p);
      const int64_t chunks = (j->T + j->chunk - 1) / j->chunk, h = i / chunks, t0 = (i % chunks) * j->chunk, t1 = std::min(j->T, t0 + j->chunk);
      thread_local std::vector<float> scores;
      scores.resize(size_t(j->p0 + j->T));
      const int64_t g = h / j->group;
      for (int64_t t = t0; t < t1; ++t)
        pk::attention_head(j->q + (t * j->heads + h) * j->d, j->kc + g * j->capacity * j->d, j->vc + g * j->capacity * j->d, j->p0 + t + 1, j->d,
                           j->scale, j->out + (t * j->heads + h) * j->d, scores.data());
    }
  };
  const int64_t chunk = 16;
  Job job{T, p0, heads, heads / kv_heads, d, capacity, chunk, q, k_cache, v_cache, out, 1.0f / std::sqrt(float(d))};
  pool().run(heads * ((T + chunk - 1) / chunk), &Job::task, &job);
}


void apply(const PkWeight& w, const float* x, float* y, int isa, int64_t* read, int64_t* total) {
  if (w.kind == 0) {
    gemv(pk::Bitmask{w.N, w.K, static_cast<const uint16_t*>(w.a), float_values(w.b, w.scales), static_cast<const int64_t*>(w.c),
                     int8_values(w.b, w.scales, w.block, w.corr, w.d)},
         x, 1, y, isa);
  } else if (w.kind == 3 || w.kind == 4) {
    gemv_int4(pk::Int4Dense{w.N, w.K, static_cast<const uint8_t*>(w.a), static_cast<const float*>(w.b), static_cast<const float*>(w.c), (w.block & 1) != 0, w.stride,
                            (w.block & 2) != 0},
              x, 1, y, isa, w.kind == 4);
  } else if (w.kind == 5) {
    gemv(pk::TwoFourInt4{w.N, w.K, static_cast<const uint8_t*>(w.a), static_cast<const uint8_t*>(w.b), w.scales, static_cast<const uint8_t*>(w.c), w.block,
                         w.stride, w.corr, w.layout == 1, static_cast<const uint8_t*>(w.d)},
         x, 1, y, isa);
  } else if (w.kind == 6) {
    gemv(pk::BitmaskInt4{w.N, w.K, static_cast<const uint16_t*>(w.a), static_cast<const uint8_t*>(w.b), static_cast<const int64_t*>(w.c), w.scales,
                         static_cast<const uint8_t*>(w.d), w.block, w.corr},
         x, 1, y, isa);
  } else if (w.kind == 7) {
    const pk::Int4InputMajor im{w.N, w.K, static_cast<const uint8_t*>(w.a), w.stride, (w.block & 1) != 0, (w.block & 2) != 0, (w.block & 4) != 0};
    *read += gemv_int4_x(im, x, w.keep > 0 ? pk::topk_threshold(x, w.K, w.keep) : w.threshold, y, isa);
    *total += w.K;
  } else if (w.kind == 1) {
    gemv(pk::TwoFour{w.N, w.K, float_values(w.a, w.scales), static_cast<const uint8_t*>(w.b), int8_values(w.a, w.scales, w.block)}, x, 1, y, isa);
  } else {
    thread_local Active act;
    const int64_t count = find_active(x, w.K, w.keep > 0 ? pk::topk_threshold(x, w.K, w.keep) : w.threshold, act);
    *read += count;
    *total += w.K;
    const int64_t cols = sparse_x_columns(w.N);
    SparseXJob job{static_cast<const float*>(w.a), w.N, act.idx.data(), act.vals.data(), count, y, cols, isa};
    pool().run((w.N + cols - 1) / cols, &SparseXJob::task, &job);
  }
}

// The gated MLP's activation act[ffn] = SiLU(gate · x) ⊙ (up · x), with CATS (L.gate_threshold >= 0):
// the gate rows first, then up only for the active activations (a row subset of a 4-bit gate_up;
// any other kind computes all of up and zeros the rest). read/total count active activations.
void gated_activation(const PkLayer& L, const float* x, std::vector<float>& gu, float* act, int isa, int64_t* read, int64_t* total) {
  const PkWeight& w = L.gate_up;
  gu.resize(size_t(2 * L.ffn));
  if (L.gate_threshold < 0) {
    apply(w, x, gu.data(), isa, read, total);
    pk::silu_mul(gu.data(), gu.data() + L.ffn, L.ffn, act);
    return;
  }
  thread_local std::vector<int32_t> rows;
  rows.resize(size_t(L.ffn));
  int64_t count = 0;
  if (w.kind == 3 || w.kind == 4) {
    pk::Int4Dense gate{L.ffn, w.K, static_cast<const uint8_t*>(w.a), static_cast<const float*>(w.b), static_cast<const float*>(w.c), (w.block & 1) != 0,
                       w.stride, (w.block & 2) != 0};
    gemv_int4(gate, x, 1, gu.data(), isa, w.kind == 4);
    count = pk::silu_active(gu.data(), L.ffn, L.gate_threshold, act, rows.data(), int32_t(L.ffn));
    pk::Int4Dense up = gate;
    up.N = count;
    up.rows = rows.data();
    if (count > 0) gemv_int4(up, x, 1, gu.data() + L.ffn, isa, w.kind == 4);
    for (int64_t j = 0; j < count; ++j) act[rows[size_t(j)] - L.ffn] *= gu[size_t(L.ffn + j)];
  } else {
    apply(w, x, gu.data(), isa, read, total);
    count = pk::silu_active(gu.data(), L.ffn, L.gate_threshold, act, rows.data(), 0);
    for (int64_t i = 0; i < L.ffn; ++i) act[i] *= gu[size_t(L.ffn + i)];
  }
  *read += count;
  *total += L.ffn;
}

struct CopyJob {
  const char* src;
  char* dst;
  int64_t bytes, chunk;
  static void task(void* p, int64_t i) {
    auto* j = static_cast<CopyJob*>(p);
    const int64_t a = i * j->chunk, b = std::min(j->bytes, a + j->chunk);
    std::memcpy(j->dst + a, j->src + a, size_t(b - a));
  }
};

}  // namespace

#define PK_API __attribute__((visibility("default")))

extern "C" {

// 0 scalar, 1 AVX2+FMA, 2 AVX-512F.
PK_API int pk_best_isa() { return g_best; }

// The top-k form's threshold (pk::topk_threshold): the (keep+1)-th largest |x_k|; -1 when keep >= K.
// AVX2 code: only on CPUs with AVX2 (the decode step that uses it requires them too).
PK_API double pk_topk_threshold(const float* x, int64_t K, int64_t keep) { return pk::topk_threshold(x, K, keep); }
PK_API int pk_isa() { return g_isa.load(); }
// Force an instruction set no better than the CPU's (tests compare every path); -1 if not available.
PK_API int pk_set_isa(int isa) {
  if (isa < kScalar || isa > g_best) return -1;
  g_isa.store(isa);
  return isa;
}
PK_API int pk_threads() { return pool().threads(); }
PK_API void pk_set_spin_us(int us) { pool().spin_us.store(us < 0 ? 0 : us); }
PK_API void pk_set_threads(int n) { pool().resize(n); }

// y[M][N] = x[M][K] · Wᵀ, W as a bitmask (see kernels.h); x and y contiguous. values: float, or
// int8 codes when scales (float[N][ceil(K/block)]) are given.
PK_API void pk_gemv(int64_t N, int64_t K, const uint16_t* masks, const void* values, const int64_t* row_off, const float* scales, int64_t block,
                    const float* corr, const float* row_sums, const float* x, int64_t M, float* y) {
  gemv(pk::Bitmask{N, K, masks, float_values(values, scales), row_off, int8_values(values, scales, block, corr, row_sums)}, x, M, y,
       g_isa.load(std::memory_order_relaxed));
}

// Whether input-major 4-bit weights (activation sparsity) run the 16-bit kernel (int4_x_vnni_avx512.cpp)
// on AVX-512 VNNI; on >= 0 switches it, -1 only asks.
PK_API int pk_int16_activations(int on) {
  if (on >= 0) g_x16.store(on != 0);
  return g_vnni && g_x16.load() ? 1 : 0;
}
// 1 when bitmask-int4 weights (with row sums) in grid blocks of `block` inputs run the 16-bit kernel on the
// chosen instruction set: the switch above on, AVX-512 chosen on a CPU with VNNI and VBMI2, blocks of 32 or
// a multiple of 64 (bitmask_int4_vnni_avx512.cpp).
PK_API int pk_bitmask_int4_int16(int64_t block) { return bitmask_int4_x16(block, g_isa.load()) ? 1 : 0; }
PK_API int pk_twofour_int4_int16(int64_t block) { return twofour_int4_x16(block, g_isa.load()) ? 1 : 0; }
// Which 16-bit-activation kernels that need row sums this CPU can run at all (whatever the switch and
// the chosen instruction set): bit 0 bitmask-int4 (VNNI + VBMI2), bit 1 2:4-int4 (VNNI + VBMI), bit 2
// dense int8 (VNNI). Where a weight's kernel cannot run, it needs no row sums.
PK_API int pk_x16_kernels() { return (g_vbmi2 ? 1 : 0) | (g_vbmi ? 2 : 0) | (g_vnni ? 4 : 0); }
// 1 when dense int8 weights that allow it (Int8Values::corr) run with int8 activations on the chosen
// instruction set: AVX-512 on a CPU with VNNI, or AVX2; set 0/1 to turn their use off/on (tests).
PK_API int pk_int8_activations(int on) {
  if (on >= 0) g_int8x.store(on != 0);
  const int isa = g_isa.load(std::memory_order_relaxed);
  return g_int8x.load() && ((isa == kAvx512 && g_vnni) || isa == kAvx2) ? 1 : 0;
}

// Whether an int4 weight of K inputs (K % 64 == 0) with the int8_activations option runs int8
// activations on the chosen instruction set (AVX-512 VNNI, or AVX2), with float grids (half = 0) or fp16 ones.
PK_API int pk_int4_int8_activations(int64_t K, int half) {
  pk::Int4Dense w{0, K, nullptr, nullptr, nullptr};
  w.half = half != 0;
  return int4_int8x(w, g_isa.load(std::memory_order_relaxed)) ? 1 : 0;
}

// Rows [n0, n1) of W, dense, into out[(n1-n0)][K].
PK_API void pk_decompress(int64_t N, int64_t K, const uint16_t* masks, const void* values, const int64_t* row_off, const float* scales,
                          int64_t block, int64_t n0, int64_t n1, float* out) {
  const pk::Bitmask w{N, K, masks, float_values(values, scales), row_off, int8_values(values, scales, block)};
  DecompressJob<pk::Bitmask> job{&w, n0, n1, out, g_isa.load(std::memory_order_relaxed)};
  pool().run((n1 - n0 + kRowsPerTask - 1) / kRowsPerTask, &DecompressJob<pk::Bitmask>::task, &job);
}

// y[M][N] = x[M][K] · Wᵀ, W 2:4 as stored (values + 2-bit positions, see kernels.h).
PK_API void pk_gemv_24(int64_t N, int64_t K, const void* values, const uint8_t* positions, const float* scales, int64_t block, const float* x,
                       int64_t M, float* y) {
  gemv(pk::TwoFour{N, K, float_values(values, scales), positions, int8_values(values, scales, block)}, x, M, y, g_isa.load(std::memory_order_relaxed));
}

PK_API void pk_decompress_24(int64_t N, int64_t K, const void* values, const uint8_t* positions, const float* scales, int64_t block, int64_t n0,
                             int64_t n1, float* out) {
  const pk::TwoFour w{N, K, float_values(values, scales), positions, int8_values(values, scales, block)};
  DecompressJob<pk::TwoFour> job{&w, n0, n1, out, g_isa.load(std::memory_order_relaxed)};
  pool().run((n1 - n0 + kRowsPerTask - 1) / kRowsPerTask, &DecompressJob<pk::TwoFour>::task, &job);
}

// y[M][N] = x[M][K] · Wᵀ, W 4-bit dense (codes, a scale and an offset per row and 32 inputs; kernels.h).
// int8x: int8 activations where the CPU has AVX-512 VNNI (K % 64 == 0; see int4_vnni_avx512.cpp).
// grid: bit 0 the zero-point form (offsets holds zero points: (code − zero) · scale), bit 1 a half grid
// (scales and offsets fp16; kernels.h). stride: rows interleaved (kernels.h), 0: separate. A half grid
// runs with fp32 activations (the VNNI kernel reads float grids).
PK_API void pk_gemv_int4(int64_t N, int64_t K, const uint8_t* codes, const float* scales, const float* offsets, int grid, int64_t stride, int int8x,
                         const float* x, int64_t M, float* y) {
  gemv_int4(pk::Int4Dense{N, K, codes, scales, offsets, (grid & 1) != 0, stride, (grid & 2) != 0}, x, M, y, g_isa.load(std::memory_order_relaxed), int8x != 0);
}

// y[j] = row rows[j] of W · x for j < count (x one row): a row subset of a 4-bit dense W, as the CATS
// decode computes up's rows (arguments as pk_gemv_int4's).
PK_API void pk_gemv_int4_rows(int64_t K, const uint8_t* codes, const float* scales, const float* offsets, int grid, int64_t stride, const int32_t* rows,
                              int64_t count, int int8x, const float* x, float* y) {
  pk::Int4Dense w{count, K, codes, scales, offsets, (grid & 1) != 0, stride, (grid & 2) != 0};
  w.rows = rows;
  gemv_int4(w, x, 1, y, g_isa.load(std::memory_order_relaxed), int8x != 0);
}

PK_API void pk_decompress_int4(int64_t N, int64_t K, const uint8_t* codes, const float* scales, const float* offsets, int grid, int64_t stride,
                               int64_t n0, int64_t n1, float* out) {
  const pk::Int4Dense w{N, K, codes, scales, offsets, (grid & 1) != 0, stride, (grid & 2) != 0};
  DecompressJob<pk::Int4Dense> job{&w, n0, n1, out, g_isa.load(std::memory_order_relaxed)};
  pool().run((n1 - n0 + kRowsPerTask - 1) / kRowsPerTask, &DecompressJob<pk::Int4Dense>::task, &job);
}

// y[M][N] = x[M][K] · Wᵀ, W 2:4 with 4-bit values (codes, positions, a scale and a uint8 zero point per
// row and block of `block` inputs: separate (stride 0), interleaved by rows of `stride` bytes, or paired
// (paired 1: pairs of rows `stride` bytes apart; kernels.h). row_sums (optional: each row's Σ of its
// values) and the paired layout let the 16-bit kernel run where the CPU has it; nibbles (optional, the
// layout of kernels.h's TwoFourInt4::nibbles) the int8-activation kernel where the instruction set is AVX2.
PK_API void pk_gemv_24_int4(int64_t N, int64_t K, const uint8_t* codes, const uint8_t* positions, const float* scales, const uint8_t* zeros, int64_t block,
                            int64_t stride, int64_t paired, const float* row_sums, const uint8_t* nibbles, const float* x, int64_t M, float* y) {
  gemv(pk::TwoFourInt4{N, K, codes, positions, scales, zeros, block, stride, row_sums, paired != 0, nibbles}, x, M, y, g_isa.load(std::memory_order_relaxed));
}

PK_API void pk_decompress_24_int4(int64_t N, int64_t K, const uint8_t* codes, const uint8_t* positions, const float* scales, const uint8_t* zeros,
                                  int64_t block, int64_t stride, int64_t paired, int64_t n0, int64_t n1, float* out) {
  const pk::TwoFourInt4 w{N, K, codes, positions, scales, zeros, block, stride, nullptr, paired != 0};
  DecompressJob<pk::TwoFourInt4> job{&w, n0, n1, out, g_isa.load(std::memory_order_relaxed)};
  pool().run((n1 - n0 + kRowsPerTask - 1) / kRowsPerTask, &DecompressJob<pk::TwoFourInt4>::task, &job);
}

// y[M][N] = x[M][K] · Wᵀ, W a bitmask with 4-bit values (masks, codes from byte row_off[n], a scale and
// a uint8 zero point per row and block of `block` inputs; kernels.h).
// row_sums (optional: each row's Σ of its values) lets the 16-bit kernel run where the CPU has it.
PK_API void pk_gemv_bitmask_int4(int64_t N, int64_t K, const uint16_t* masks, const uint8_t* codes, const int64_t* row_off, const float* scales,
                                 const uint8_t* zeros, int64_t block, const float* row_sums, const float* x, int64_t M, float* y) {
  gemv(pk::BitmaskInt4{N, K, masks, codes, row_off, scales, zeros, block, row_sums}, x, M, y, g_isa.load(std::memory_order_relaxed));
}

PK_API void pk_decompress_bitmask_int4(int64_t N, int64_t K, const uint16_t* masks, const uint8_t* codes, const int64_t* row_off, const float* scales,
                                       const uint8_t* zeros, int64_t block, int64_t n0, int64_t n1, float* out) {
  const pk::BitmaskInt4 w{N, K, masks, codes, row_off, scales, zeros, block};
  DecompressJob<pk::BitmaskInt4> job{&w, n0, n1, out, g_isa.load(std::memory_order_relaxed)};
  pool().run((n1 - n0 + kRowsPerTask - 1) / kRowsPerTask, &DecompressJob<pk::BitmaskInt4>::task, &job);
}

// y[N] = Σ_a vals[a] · wt[idx[a], :] (wt: K × N input-major; the inputs not listed are skipped).
PK_API void pk_gemv_sparse_x(int64_t N, const float* wt, const int32_t* idx, const float* vals, int64_t count, float* y) {
  const int64_t cols = sparse_x_columns(N);
  SparseXJob job{wt, N, idx, vals, count, y, cols, g_isa.load(std::memory_order_relaxed)};
  pool().run((N + cols - 1) / cols, &SparseXJob::task, &job);
}

// y[N] = x[K] · Wᵀ for an input-major 4-bit W (pk::Int4InputMajor), reading only the inputs with
// |x_k| > threshold (threshold < 0: every input). Returns how many were read.
// grid: bit 0 the zero-point form, bit 1 a half grid, bit 2 int8 activations (where the instruction set
// is AVX2 or scalar; AVX-512 multiplies float activations).
PK_API int64_t pk_gemv_int4_x(int64_t N, int64_t K, const uint8_t* data, int64_t ld, int grid, const float* x, double threshold, float* y) {
  return gemv_int4_x(pk::Int4InputMajor{N, K, data, ld, (grid & 1) != 0, (grid & 2) != 0, (grid & 4) != 0}, x, threshold, y,
                     g_isa.load(std::memory_order_relaxed));
}

// x[M][K] (K % 32 == 0) rounded as the int8-activation kernels round it, as floats: xq = q · scale per
// row and block of 32, and d[M][K/32] = Σx − Σxq per block (the kernels multiply offsets by Σx). The
// prefill path's input: decompressed tiles times xq, plus offsets times d, is the kernels' result.
PK_API void pk_round_int8_blocks(const float* x, int64_t M, int64_t K, float* xq, float* d) {
  for (int64_t b = 0; b < M * (K / 32); ++b) {
    const float* v = x + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float s = int8_scale(amax), inv = 1.f / s;
    double sx = 0.0, sq = 0.0;
    for (int j = 0; j < 32; ++j) {
      const float r = round_int8(v[j], inv) * s;
      xq[b * 32 + j] = r;
      sx += double(v[j]);
      sq += double(r);
    }
    d[b] = float(sx - sq);
  }
}

// Wᵀ rows [k0, k1) of an input-major 4-bit W, dense, into out[(k1-k0)][N] (the prefill path).
PK_API void pk_decompress_int4_x(int64_t N, int64_t K, const uint8_t* data, int64_t ld, int grid, int64_t k0, int64_t k1, float* out) {
  const pk::Int4InputMajor w{N, K, data, ld, (grid & 1) != 0, (grid & 2) != 0};
  Int4InputMajorDecompressJob job{&w, k0, k1, out, g_isa.load(std::memory_order_relaxed)};
  pool().run((k1 - k0 + 31) / 32, &Int4InputMajorDecompressJob::task, &job);
}

// One decode step of a token through every layer: h (hidden) in and out; the new K/V written at
// position pos of each layer's cache; cos/sin the rotary row of pos (head_dim each). Returns 0, or
// -1 when this CPU has no AVX2 + FMA (the caller then runs its own path). read/total count the
// inputs an input-skipping linear read.
PK_API int pk_decode_layers(int64_t n_layers, const PkLayer* layers, int64_t hidden, float* h, int64_t pos, const float* cos, const float* sin,
                            float eps, int64_t* read, int64_t* total) {
  if (g_best < kAvx2) return -1;
  const int isa = g_isa.load(std::memory_order_relaxed);
  std::vector<float> a(static_cast<size_t>(hidden)), tmp(static_cast<size_t>(hidden)), buf, attn, gu, act;
  for (int64_t l = 0; l < n_layers; ++l) {
    const PkLayer& L = layers[l];
    const int64_t d = L.head_dim, qn = L.heads * d, kn = L.kv_heads * d;
    if (pos >= L.capacity) return -2;
    buf.resize(size_t(qn + 2 * kn));
    attn.resize(size_t(qn));
    pk::rmsnorm(h, L.attn_norm, hidden, eps, a.data());
    apply(L.qkv, a.data(), buf.data(), isa, read, total);
    if (L.qkv_bias)
      for (int64_t i = 0; i < qn + 2 * kn; ++i) buf[size_t(i)] += L.qkv_bias[i];
    float* q = buf.data();
    attend(1, pos, L.heads, L.kv_heads, d, q, q + qn, q + qn + kn, cos, sin, L.k_cache, L.v_cache, L.capacity, attn.data());
    apply(L.o, attn.data(), tmp.data(), isa, read, total);
    for (int64_t i = 0; i < hidden; ++i) h[i] += tmp[size_t(i)];
    pk::rmsnorm(h, L.mlp_norm, hidden, eps, a.data());
    act.resize(size_t(L.ffn));
    gated_activation(L, a.data(), gu, act.data(), isa, read, total);
    apply(L.down, act.data(), tmp.data(), isa, read, total);
    for (int64_t i = 0; i < hidden; ++i) h[i] += tmp[size_t(i)];
  }
  return 0;
}

// The attention of a prefill (batch 1, positions 0 .. T-1): attend() with p0 = 0, the decode step's own
// code. Returns 0, -1 without AVX2 + FMA (the caller runs its own path), -2 when T exceeds the capacity.
PK_API int pk_prefill_attention(int64_t T, int64_t heads, int64_t kv_heads, int64_t d, float* q, float* k, const float* v, const float* cos,
                                const float* sin, float* k_cache, float* v_cache, int64_t capacity, float* out) {
  if (g_best < kAvx2) return -1;
  if (T > capacity) return -2;
  attend(T, 0, heads, kv_heads, d, q, k, v, cos, sin, k_cache, v_cache, capacity, out);
  return 0;
}

// Copy bandwidth of this machine with the pool's threads, in bytes moved (read + written) per second.
PK_API double pk_copy_bandwidth(int64_t bytes, int reps) {
  std::vector<char> src(size_t(bytes), 1), dst(size_t(bytes), 0);
  const int64_t chunk = (1 << 20);
  CopyJob job{src.data(), dst.data(), bytes, chunk};
  const int64_t ntasks = (bytes + chunk - 1) / chunk;
  pool().run(ntasks, &CopyJob::task, &job);  // touch the pages first
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool().run(ntasks, &CopyJob::task, &job);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * double(bytes) / s);
  }
  return best;
}

}  // extern "C"
