// The small operations of a decode step, fused: a decode step of the 24-layer model runs ~45 PyTorch
// operators per layer besides its matrix products (norms, rotary embedding, cache writes, attention,
// residual adds), each a few microseconds of dispatch for a few kilobytes of work. These ops do the
// same arithmetic in one call each (fp32 throughout):
//
//   rmsnorm(x, w, eps)                       x * rsqrt(mean(x^2) + eps) * w                (M, C)
//   add_rmsnorm(x, r, w, eps)                h = x + r; (h, rmsnorm(h, w, eps))           (M, C) twice
//   decode_attention(qkv, cos, sin, k, v, rows, pos, n_head, n_groups)
//       one new position per batch row: rotary embedding of its queries and key (NeoX halves; cos / sin
//       are the model's (positions, hs) tables, row pos[b] is used), the key
//       and value written into the cache at [rows[b], :, pos[b]], then softmax(q k^T / sqrt(hs)) v over
//       cache positions 0..pos[b] of that row; qkv in litgpt's grouped layout, per key/value group its
//       n_head / n_groups query heads then one key and one value head. -> (B, n_head * hs)
//
// Registered next to gemv (omnitalk/csrc/gemv.cpp) as torch.ops.omnitalk.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace {

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// ---- dot products and y += a * x over one head (hs floats) -----------------------------------------
T512 float dot512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}
T512 void axpy512(float a, const float* x, float* y, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(y + k, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + k), _mm512_loadu_ps(y + k)));
  for (; k < n; ++k) y[k] += a * x[k];
}
float dot_plain(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}
void axpy_plain(float a, const float* x, float* y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}
inline float dot(const float* a, const float* b, int64_t n) { return omnitalk_isa::has_avx512() ? dot512(a, b, n) : dot_plain(a, b, n); }
inline void axpy(float a, const float* x, float* y, int64_t n) { omnitalk_isa::has_avx512() ? axpy512(a, x, y, n) : axpy_plain(a, x, y, n); }

void check_rows(const at::Tensor& x, int64_t C, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
              x.size(1) == C, "omnitalk.", what, ": expected a contiguous fp32 CPU tensor (M, ", C, ")");
}

void norm_rows(const float* h, const float* w, float eps, float* out, int64_t M, int64_t C) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = h + m * C;
    const float ms = dot(r, r, C) / static_cast<float>(C);
    const float inv = 1.f / std::sqrt(ms + eps);
    for (int64_t c = 0; c < C; ++c) out[m * C + c] = r[c] * inv * w[c];
  }
}

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(w.view({1, -1}), w.numel(), "rmsnorm (weight)");
  check_rows(x, w.numel(), "rmsnorm");
  at::Tensor y = at::empty_like(x);
  norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), static_cast<float>(eps), y.data_ptr<float>(), x.size(0),
            x.size(1));
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w,
                                               double eps) {
  const int64_t C = w.numel();
  check_rows(w.view({1, -1}), C, "add_rmsnorm (weight)");
  check_rows(x, C, "add_rmsnorm");
  check_rows(r, C, "add_rmsnorm");
  TORCH_CHECK(x.size(0) == r.size(0), "omnitalk.add_rmsnorm: x and r must have the same rows");
  at::Tensor h = at::empty_like(x), y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) hp[i] = xp[i] + rp[i];
  norm_rows(hp, w.data_ptr<float>(), static_cast<float>(eps), y.data_ptr<float>(), x.size(0), C);
  return {h, y};
}

// NeoX rotary embedding of one head: out[i] = x[i] cos[i] - x[i + h] sin[i] (i < h),
// out[i] = x[i] cos[i] + x[i - h] sin[i] (i >= h), h = hs / 2; cos / sin duplicated over both halves.
inline void rope(const float* x, const float* cos, const float* sin, float* out, int64_t hs) {
  const int64_t h = hs / 2;
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * cos[i] - x[i + h] * sin[i];
  for (int64_t i = h; i < hs; ++i) out[i] = x[i] * cos[i] + x[i - h] * sin[i];
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& rows,
                            const at::Tensor& pos, int64_t n_head, int64_t n_groups) {
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.is_contiguous() && vc.is_contiguous() &&
              kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat,
              "omnitalk.decode_attention: the caches must be contiguous fp32 (rows, groups, positions, hs)");
  const int64_t B = qkv.size(0), R = kc.size(0), G = kc.size(1), L = kc.size(2), hs = kc.size(3);
  TORCH_CHECK(n_groups == G && n_head % G == 0 && hs % 2 == 0,
              "omnitalk.decode_attention: ", n_head, " query heads in ", n_groups, " groups do not match the cache");
  const int64_t qpg = n_head / G, W = (n_head + 2 * G) * hs;
  check_rows(qkv, W, "decode_attention (qkv)");
  check_rows(cos, hs, "decode_attention (cos)");
  check_rows(sin, hs, "decode_attention (sin)");
  const int64_t P = std::min(cos.size(0), sin.size(0));
  TORCH_CHECK(rows.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && rows.numel() == B &&
              pos.numel() == B, "omnitalk.decode_attention: rows and pos must be int64 tensors of B values");
  const at::Tensor rows_c = rows.contiguous(), pos_c = pos.contiguous();
  const int64_t *rp = rows_c.data_ptr<int64_t>(), *pp = pos_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] >= 0 && rp[b] < R && pp[b] >= 0 && pp[b] < L && pp[b] < P,
                "omnitalk.decode_attention: row ", rp[b], " / position ", pp[b], " outside the cache (", R, " x ", L, ")");
  const float *q_in = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  at::Tensor y = at::zeros({B, n_head * hs}, qkv.options());
  float* yp = y.data_ptr<float>();
  // 1. the new key (rotated) and value of every row and group into the cache
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      const float* base = q_in + b * W + g * (qpg + 2) * hs;
      const int64_t at = ((rp[b] * G + g) * L + pp[b]) * hs;
      rope(base + qpg * hs, cp + pp[b] * hs, sp + pp[b] * hs, kp + at, hs);
      std::copy(base + (qpg + 1) * hs, base + (qpg + 2) * hs, vp + at);
    }
  // 2. attention, one (row, query head) per task
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  at::parallel_for(0, B * n_head, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(hs), p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_head, h = t % n_head, g = h / qpg, S = pp[b] + 1;
      rope(q_in + b * W + (g * (qpg + 2) + h % qpg) * hs, cp + pp[b] * hs, sp + pp[b] * hs, q.data(), hs);
      const float* K = kp + (rp[b] * G + g) * L * hs;
      const float* V = vp + (rp[b] * G + g) * L * hs;
      p.resize(S);
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, p[s] = dot(q.data(), K + s * hs, hs) * scale);
      float sum = 0.f;
      for (int64_t s = 0; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
      float* out = yp + b * n_head * hs + h * hs;
      for (int64_t s = 0; s < S; ++s) axpy(p[s] / sum, V + s * hs, out, hs);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(omnitalk, m) {
  m.def("rmsnorm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rmsnorm(Tensor x, Tensor r, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, Tensor rows, "
        "Tensor pos, int n_head, int n_groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(omnitalk, CPU, m) {
  m.impl("rmsnorm", rmsnorm);
  m.impl("add_rmsnorm", add_rmsnorm);
  m.impl("decode_attention", decode_attention);
}
