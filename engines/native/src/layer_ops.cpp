// The small per-token operations of a decode step (compiled with -mavx2 -mfma, plain loops the
// compiler vectorises): RMSNorm, rotary embedding (rotate-half convention), one attention head over
// the KV cache, and the SiLU-gated product. The decoder runs them only on CPUs with AVX2 + FMA.
#include <cmath>

#include "kernels.h"

namespace pk {

void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
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
    const float* k = kc + t * d;
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * k[i];
    s *= scale;
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

void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace pk
