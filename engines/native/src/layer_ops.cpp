// The small per-token operations of a decode step (compiled with -mavx2 -mfma, plain loops the
// compiler vectorises): RMSNorm, rotary embedding (rotate-half convention), one attention head over
// the KV cache, and the SiLU-gated product. The decoder runs them only on CPUs with AVX2 + FMA.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace pk {

// q · k with four independent 8-wide accumulators (a float reduction the compiler does not
// vectorise on its own without relaxing the order of additions).
inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= d; i += 32)
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j), acc[j]);
  for (; i + 8 <= d; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  const __m256 s4 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(s4), _mm256_extractf128_ps(s4, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  float r = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  for (; i < d; ++i) r += a[i] * b[i];
  return r;
}


void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float ss = dot(x, x, n);
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

void rope(float* v, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t h2 = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * d;
    for (int64_t i = 0; i < h2; ++i) {
      const float a = p[i], b = p[i + h2];
      p[i] = a * cos[i] - b * sin[i];
      p[i + h2] = b * cos[i + h2] + a * sin[i + h2];
    }
  }
}

// e^x for 8 lanes (x ≤ 88; below −87.3 the result is clamped to e^−87.3 ≈ 1.2e−38): x = n·ln 2 + r
// with |r| ≤ ln 2 / 2 (ln 2 in two parts), e^r by its degree-6 Taylor polynomial (relative error
// below 2e−7 there), times 2^n built in the exponent bits. Within a few float ulps of std::exp.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // (a NaN stays NaN: maxps returns its second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The sums of eight 8-wide vectors, one per lane: lane j = Σ of a[j]'s lanes.
inline __m256 sums8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One query against n cached keys and values (a decode step's head, or one prefill query). A first
// version took a dot product per key, each ending in a horizontal sum, std::exp per score and the
// output vector re-read and re-written per key; a perf profile of native decoding showed it as the
// largest cost after the linears and the LM head (docs/native.md, "The decode step's fixed costs").
// Here, for d a multiple of 8, eight keys' dot products at a time (one accumulator each, summed
// together by sums8), the exponentials eight at a time (exp8), and the output in registers 64 lanes
// at a time over all keys.
void attention_head(const float* q, const float* kc, const float* vc, int64_t n, int64_t d, float scale, float* out, float* scores) {
  int64_t t = 0;
  if (d % 8 == 0) {
    for (; t + 8 <= n; t += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      const float* k = kc + t * d;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qi = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + j * d + i), acc[j]);
      }
      _mm256_storeu_ps(scores + t, _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale)));
    }
  }
  for (; t < n; ++t) scores[t] = dot(q, kc + t * d, d) * scale;
  float mx = -INFINITY;
  for (t = 0; t < n; ++t) mx = scores[t] > mx ? scores[t] : mx;
  __m256 vsum = _mm256_setzero_ps();
  for (t = 0; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(scores + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = 0.f;
  if (t < n) {  // the last n % 8 scores, through the same exp8 (a padded copy)
    alignas(32) float tail[8];
    for (int j = 0; j < 8; ++j) tail[j] = t + j < n ? scores[t + j] - mx : 0.f;
    _mm256_store_ps(tail, exp8(_mm256_load_ps(tail)));
    for (int64_t j = 0; t + j < n; ++j) sum += scores[t + j] = tail[j];
  }
  sum += hsum(vsum);
  const float inv = 1.0f / sum;
  for (t = 0; t < n; ++t) scores[t] *= inv;
  int64_t i0 = 0;
  for (; i0 + 64 <= d; i0 += 64) {  // 64 output lanes in registers over every key
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (t = 0; t < n; ++t) {
      const __m256 p = _mm256_set1_ps(scores[t]);
      const float* v = vc + t * d + i0;
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + i0 + 8 * j, acc[j]);
  }
  for (int64_t i = i0; i < d; ++i) out[i] = 0.f;
  for (t = 0; t < n && i0 < d; ++t) {
    const float p = scores[t];
    const float* v = vc + t * d;
    for (int64_t i = i0; i < d; ++i) out[i] += p * v[i];
  }
}

// The top-k form of activation sparsity: the (keep+1)-th largest |x_k|, so that the inputs above it
// (at most keep; ties at that value go) are the kept ones — core.activation.topk_threshold's rule.
// keep >= K: every input (-1). The magnitudes' bit patterns (sign cleared) order as the magnitudes
// do, so the value is found exactly by bisecting on them, counting with 8-wide compares: about 31
// branch-free passes over K ints. A first version with std::nth_element took 0.82 ms per SmolLM2 token
// in place (120 calls; a temporary timer, not kept — presumably its data-dependent branches).
double topk_threshold(const float* x, int64_t K, int64_t keep) {
  if (keep >= K) return -1.0;
  thread_local std::vector<int32_t> b;
  b.resize(size_t(K));
  int32_t hi = 0;
  for (int64_t k = 0; k < K; ++k) {
    int32_t v;
    std::memcpy(&v, x + k, sizeof v);
    v &= 0x7fffffff;
    b[size_t(k)] = v;
    hi = v > hi ? v : hi;
  }
  const int32_t* p = b.data();
  auto count_ge = [&](int32_t t) {  // how many magnitudes are >= the one with bits t
    const __m256i below = _mm256_set1_epi32(t - 1);
    __m256i acc = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      acc = _mm256_sub_epi32(acc, _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)), below));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    int64_t n = 0;
    for (int i = 0; i < 8; ++i) n += lanes[i];
    for (; k < K; ++k) n += p[k] >= t ? 1 : 0;
    return n;
  };
  int32_t lo = 0;  // count_ge(0) = K > keep
  while (lo < hi) {  // the largest t with at least keep + 1 magnitudes >= it: the (keep+1)-th largest
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (count_ge(mid) >= keep + 1)
      lo = mid;
    else
      hi = mid - 1;
  }
  float t;
  std::memcpy(&t, &lo, sizeof t);
  return double(t);
}

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

int64_t silu_active(const float* g, int64_t n, double threshold, float* act, int32_t* rows, int32_t base) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free: every index written, the active ones kept
    const float s = g[i] / (1.0f + std::exp(-g[i]));
    const bool on = std::fabs(double(s)) > threshold;
    act[i] = on ? s : 0.f;
    rows[count] = base + int32_t(i);
    count += on ? 1 : 0;
  }
  return count;
}

}  // namespace pk
