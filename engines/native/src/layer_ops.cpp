// The small per-token operations of a decode step (compiled with -mavx2 -mfma, plain loops the
// compiler vectorises): RMSNorm, rotary embedding (rotate-half convention), one attention head over
// the KV cache, and the SiLU-gated product. The decoder runs them only on CPUs with AVX2 + FMA.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

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

void attention_head(const float* q, const float* kc, const float* vc, int64_t n, int64_t d, float scale, float* out, float* scores) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    float s = dot(q, kc + t * d, d) * scale;
    scores[t] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    scores[t] = std::exp(scores[t] - mx);
    sum += scores[t];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float p = scores[t] * inv;
    const float* v = vc + t * d;
    for (int64_t i = 0; i < d; ++i) out[i] += p * v[i];
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
