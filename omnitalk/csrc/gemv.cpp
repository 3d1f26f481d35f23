// Decode-step matrix-vector products for a few rows: y (M, N) = x (M, K) . W (N, K)^T [* scale (N)].
//
// A decode step multiplies one or two activation rows by every weight matrix once, so its speed is the
// speed at which the weights stream from memory. These kernels stream each weight row exactly once for
// all M rows, widen it to fp32 in registers (int8 -> fp32, bf16 -> fp32, or fp32 as is) and accumulate
// with fp32 FMAs: weight-only quantisation, activations stay fp32 — except int8 weights on a CPU with
// AVX-512 VNNI, where the activation rows are quantised to 8 bits per block of 64 (see q8_block below). Work is split over output rows with
// ATen's thread pool (at::parallel_for), so every thread streams one contiguous block of the weight.
// gemv_swiglu computes a SwiGLU MLP's first half, silu(x . W1^T) * (x . W2^T), in one pass over both
// matrices. dequant_bf16 widens int8 weights to bf16 for the prefill's GEMM.
//
// AVX-512 and AVX2 bodies are compiled with target attributes and chosen at run time, so the built
// library also runs on a CPU without AVX-512. Registered as torch.ops.omnitalk.gemv / gemv_swiglu /
// dequant_bf16 / isa / set_int8_activations / int8_activations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "isa.h"

namespace {

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define T256 __attribute__((target("avx2,fma")))

// ---- widen 16 (AVX-512) or 8 (AVX2) weights to fp32 ------------------------------------------------
T512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
T512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
T512 inline __m512 load16(const at::BFloat16* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
T256 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
T256 inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
T256 inline __m256 load8(const at::BFloat16* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
T256 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t PF_BYTES = 14 * 1024;  // software prefetch distance, in bytes of weights ahead

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

struct Args {
  const float* x; int64_t M, K;  // x (M, K) contiguous fp32
  const void* w;                 // W (N, K) contiguous
  const void* scale;             // (N,) or null
  bool scale_bf16;
  float* y; int64_t N;           // y (M, N) contiguous fp32
};

inline float scale_at(const Args& a, int64_t n) {
  if (!a.scale) return 1.f;
  return a.scale_bf16 ? static_cast<float>(static_cast<const at::BFloat16*>(a.scale)[n])
                      : static_cast<const float*>(a.scale)[n];
}

// NB output rows at a time, all M activation rows: NB * M independent accumulators hide FMA latency.
template <int M, int NB, typename W>
T512 void block512(const Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
  const W* w = static_cast<const W*>(a.w);
  const int64_t K = a.K, K16 = K / 16 * 16;
  const int64_t PF = std::max<int64_t>(1, PF_BYTES / (NB * K * static_cast<int64_t>(sizeof(W))));
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m512 acc[NB][M];
    for (int i = 0; i < NB; ++i)
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
    // prefetch the block PF blocks ahead, its bytes spread evenly over this block's loop
    const char* pf = reinterpret_cast<const char*>(w + (n + PF * NB) * K);
    const int64_t pf_step = NB * 16 * static_cast<int64_t>(sizeof(W));
    for (int64_t k = 0; k < K16; k += 16) {
      if (n + (PF + 1) * NB <= n1)
        for (int64_t b = 0; b < pf_step; b += 64) _mm_prefetch(pf + k * NB * sizeof(W) + b, _MM_HINT_T0);
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
      for (int i = 0; i < NB; ++i) {
        __m512 wv = load16(w + (n + i) * K + k);
        for (int m = 0; m < M; ++m) acc[i][m] = _mm512_fmadd_ps(wv, xv[m], acc[i][m]);
      }
    }
    for (int i = 0; i < NB; ++i) {
      const float s = scale_at(a, n + i);
      for (int m = 0; m < M; ++m) {
        float t = _mm512_reduce_add_ps(acc[i][m]);
        for (int64_t k = K16; k < K; ++k) t += x[m * K + k] * to_float(w[(n + i) * K + k]);
        y[m * a.N + n + i] = t * s;
      }
    }
  }
  if (n < n1) block512<M, 1, W>(a, x, y, n, n1);
}

template <int M, int NB, typename W>
T256 void block256(const Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
  const W* w = static_cast<const W*>(a.w);
  const int64_t K = a.K, K8 = K / 8 * 8;
  const int64_t PF = std::max<int64_t>(1, PF_BYTES / (NB * K * static_cast<int64_t>(sizeof(W))));
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m256 acc[NB][M];
    for (int i = 0; i < NB; ++i)
      for (int m = 0; m < M; ++m) acc[i][m] = _mm256_setzero_ps();
    const char* pf = reinterpret_cast<const char*>(w + (n + PF * NB) * K);
    const int64_t pf_step = NB * 8 * static_cast<int64_t>(sizeof(W));
    for (int64_t k = 0; k < K8; k += 8) {
      if (n + (PF + 1) * NB <= n1)
        for (int64_t b = 0; b < pf_step; b += 64) _mm_prefetch(pf + k * NB * sizeof(W) + b, _MM_HINT_T0);
      for (int i = 0; i < NB; ++i) {
        __m256 wv = load8(w + (n + i) * K + k);
        for (int m = 0; m < M; ++m) acc[i][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[i][m]);
      }
    }
    for (int i = 0; i < NB; ++i) {
      const float s = scale_at(a, n + i);
      for (int m = 0; m < M; ++m) {
        float t = hsum8(acc[i][m]);
        for (int64_t k = K8; k < K; ++k) t += x[m * K + k] * to_float(w[(n + i) * K + k]);
        y[m * a.N + n + i] = t * s;
      }
    }
  }
  if (n < n1) block256<M, 1, W>(a, x, y, n, n1);
}

// ---- int8 weights x 8-bit activations (AVX-512 VNNI) ------------------------------------------------
// With int8 weights the fp32 path above is bound by the widening (int8 -> int32 -> fp32, then one FMA per
// activation row) rather than by memory. Here the activation rows are quantised too, in blocks of 64
// (one scale per block, round to nearest, |q| <= 127, as llama.cpp's Q8_0 activations), and each block
// of 64 weights costs one vpdpbusd per row: an exact integer dot product, scaled by the block's scale
// into an fp32 accumulator. vpdpbusd multiplies unsigned by signed bytes, so the weights enter as
// w + 128 (a sign-bit flip) and 128 * sum(q) of every block is taken back out per row.
constexpr int64_t QB = 64;  // activation block

#define TVNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

struct QAct {
  const int8_t* q;     // (M, K)
  const float* s;      // (M, K / QB) block scales
  const float* corr;   // (M,): 128 * sum_b s_b * sum(q in block b)
};

// Quantise the activation rows (called once per gemv, before the threads start; the buffers are the
// calling thread's own and are reused, so a decode step allocates nothing here). Rounds to nearest even,
// as std::nearbyint: vcvtps2dq under the default MXCSR.
TVNNI QAct quantize_act(const float* x, int64_t M, int64_t K) {
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> sbuf, cbuf;
  const int64_t KB = K / QB;
  qbuf.resize(M * K);
  sbuf.resize(M * KB);
  cbuf.resize(M);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    double c = 0;
    for (int64_t b = 0; b < KB; ++b) {
      const float* xb = x + m * K + b * QB;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = 0; k < QB; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + k)));
      const float amax = _mm512_reduce_max_ps(mx);
      const float sc = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 iv = _mm512_set1_ps(inv);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < QB; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + k), iv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qbuf.data() + m * K + b * QB + k), _mm512_cvtepi32_epi8(v));
      }
      sbuf[m * KB + b] = sc;
      c += 128.0 * sc * _mm512_reduce_add_epi32(sum);
    }
    cbuf[m] = static_cast<float>(c);
  }
  return {qbuf.data(), sbuf.data(), cbuf.data()};
}

template <int M, int NB>
TVNNI void q8_block(const Args& a, const QAct& qa, int64_t m0, float* y, int64_t n0, int64_t n1) {
  const int8_t* w = static_cast<const int8_t*>(a.w);
  const int64_t K = a.K, KB = K / QB;
  const int8_t* xq = qa.q + m0 * K;
  const float* xs = qa.s + m0 * KB;
  const float* corr = qa.corr + m0;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t PF = std::max<int64_t>(1, PF_BYTES / (NB * K));
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m512 acc[NB][M];
    for (int i = 0; i < NB; ++i)
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
    const char* pf = reinterpret_cast<const char*>(w + (n + PF * NB) * K);
    for (int64_t b = 0; b < KB; ++b) {
      if (n + (PF + 1) * NB <= n1)
        for (int i = 0; i < NB; ++i) _mm_prefetch(pf + i * K + b * QB, _MM_HINT_T0);
      __m512i xv[M];
      __m512 sv[M];
      for (int m = 0; m < M; ++m) {
        xv[m] = _mm512_loadu_si512(xq + m * K + b * QB);
        sv[m] = _mm512_set1_ps(xs[m * KB + b]);
      }
      for (int i = 0; i < NB; ++i) {
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + (n + i) * K + b * QB), flip);
        for (int m = 0; m < M; ++m) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[m]);
          acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[m], acc[i][m]);
        }
      }
    }
    for (int i = 0; i < NB; ++i) {
      const float sc = scale_at(a, n + i);
      for (int m = 0; m < M; ++m) y[m * a.N + n + i] = (_mm512_reduce_add_ps(acc[i][m]) - corr[m]) * sc;
    }
  }
  if (n < n1) q8_block<M, 1>(a, qa, m0, y, n, n1);
}

// Rows [n0, n1) of y for every activation row, 8-bit activations.
void q8_rows(const Args& a, const QAct& qa, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    float* y = a.y + m0 * a.N;
    switch (std::min<int64_t>(4, a.M - m0)) {
      case 1: q8_block<1, 4>(a, qa, m0, y, n0, n1); break;
      case 2: q8_block<2, 4>(a, qa, m0, y, n0, n1); break;
      case 3: q8_block<3, 2>(a, qa, m0, y, n0, n1); break;
      default: q8_block<4, 2>(a, qa, m0, y, n0, n1); break;
    }
  }
}

// 8-bit activations for int8 weights: on by default where the CPU has AVX-512 VNNI; OMNITALK_INT8_ACT=0
// (or set_int8_activations(False)) keeps fp32 activations.
std::atomic<bool>& act8_flag() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("OMNITALK_INT8_ACT");
    return !(v && (std::string(v) == "0" || std::string(v) == "off" || std::string(v) == "false"));
  }()};
  return on;
}

using omnitalk_isa::has_vnni;

inline bool use_q8(const Args& a, at::ScalarType t) {
  return t == at::kChar && a.K % QB == 0 && act8_flag().load(std::memory_order_relaxed) && has_vnni();
}

bool set_int8_activations(bool on) { return act8_flag().exchange(on); }
bool int8_activations() { return act8_flag().load() && has_vnni(); }

using omnitalk_isa::has_avx2;
using omnitalk_isa::has_avx512;

// Rows [n0, n1) for up to 8 activation rows starting at x (chunks of 8 are run one after another).
template <typename W>
void rows(const Args& a, const float* x, float* y, int64_t M, int64_t n0, int64_t n1) {
  if (has_avx512()) {
    switch (M) {
      case 1: return block512<1, 8, W>(a, x, y, n0, n1);
      case 2:  // long rows (the MLP's down projection): 8 rows per block halve the reloads of x
        return a.K >= 2048 ? block512<2, 8, W>(a, x, y, n0, n1) : block512<2, 4, W>(a, x, y, n0, n1);
      case 3: return block512<3, 4, W>(a, x, y, n0, n1);
      case 4: return block512<4, 4, W>(a, x, y, n0, n1);
      case 5: return block512<5, 2, W>(a, x, y, n0, n1);
      case 6: return block512<6, 2, W>(a, x, y, n0, n1);
      case 7: return block512<7, 2, W>(a, x, y, n0, n1);
      default: return block512<8, 2, W>(a, x, y, n0, n1);
    }
  }
  switch (M) {
    case 1: return block256<1, 4, W>(a, x, y, n0, n1);
    case 2: return block256<2, 4, W>(a, x, y, n0, n1);
    case 3: return block256<3, 2, W>(a, x, y, n0, n1);
    case 4: return block256<4, 2, W>(a, x, y, n0, n1);
    case 5: return block256<5, 1, W>(a, x, y, n0, n1);
    case 6: return block256<6, 1, W>(a, x, y, n0, n1);
    case 7: return block256<7, 1, W>(a, x, y, n0, n1);
    default: return block256<8, 1, W>(a, x, y, n0, n1);
  }
}

Args make_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                const char* op) {
  TORCH_CHECK(has_avx2(), "omnitalk.", op, " needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "omnitalk.", op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "omnitalk.", op, ": x must be a contiguous fp32 (M, K) tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "omnitalk.", op, ": w must be a contiguous (N, K) tensor with K = x.size(1)");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar || w.scalar_type() == at::kBFloat16,
              "omnitalk.", op, ": weights must be fp32, bf16 or int8, got ", w.scalar_type());
  Args a{x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr(), nullptr, false, nullptr, w.size(0)};
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == w.size(0) && scale->is_contiguous() &&
                (scale->scalar_type() == at::kFloat || scale->scalar_type() == at::kBFloat16),
                "omnitalk.", op, ": scale must be a contiguous fp32 or bf16 (N,) tensor");
    a.scale = scale->data_ptr();
    a.scale_bf16 = scale->scalar_type() == at::kBFloat16;
  }
  return a;
}

// Rows [n0, n1) of y for every activation row, whatever the weight type.
void rows_any(const Args& a, at::ScalarType t, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += 8) {
    const int64_t m = std::min<int64_t>(8, a.M - m0);
    switch (t) {
      case at::kFloat: rows<float>(a, a.x + m0 * a.K, a.y + m0 * a.N, m, n0, n1); break;
      case at::kChar: rows<int8_t>(a, a.x + m0 * a.K, a.y + m0 * a.N, m, n0, n1); break;
      default: rows<at::BFloat16>(a, a.x + m0 * a.K, a.y + m0 * a.N, m, n0, n1); break;
    }
  }
}

// Each thread takes one contiguous block of output rows (= of the weight) for all M rows.
int64_t grain(int64_t N) { return std::max<int64_t>(32, N / (8 * at::get_num_threads())); }

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                const c10::optional<at::Tensor>& bias) {
  Args a = make_args(x, w, scale, "gemv");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous() &&
                bias->scalar_type() == at::kFloat, "omnitalk.gemv: bias must be a contiguous fp32 (N,) tensor");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  a.y = y.data_ptr<float>();
  const auto t = w.scalar_type();
  const bool q8 = use_q8(a, t);
  const QAct qa = q8 ? quantize_act(a.x, a.M, a.K) : QAct{};
  at::parallel_for(0, a.N, grain(a.N), [&](int64_t n0, int64_t n1) {
    if (q8) q8_rows(a, qa, n0, n1); else rows_any(a, t, n0, n1);
    if (b)
      for (int64_t m = 0; m < a.M; ++m)
        for (int64_t n = n0; n < n1; ++n) a.y[m * a.N + n] += b[n];
  });
  return y;
}

// silu(x . W1^T * s1) * (x . W2^T * s2): the gate and up projections of a SwiGLU MLP, each thread
// streaming its block of rows of both matrices, then combining them while they are in cache.
at::Tensor gemv_swiglu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& s1,
                       const at::Tensor& w2, const c10::optional<at::Tensor>& s2) {
  Args a1 = make_args(x, w1, s1, "gemv_swiglu"), a2 = make_args(x, w2, s2, "gemv_swiglu");
  TORCH_CHECK(w1.sizes() == w2.sizes() && w1.scalar_type() == w2.scalar_type(),
              "omnitalk.gemv_swiglu: both weights must have the same shape and type");
  at::Tensor y = at::empty({a1.M, a1.N}, x.options()), up = at::empty({a1.M, a1.N}, x.options());
  a1.y = y.data_ptr<float>();
  a2.y = up.data_ptr<float>();
  const auto t = w1.scalar_type();
  const bool q8 = use_q8(a1, t);
  const QAct qa = q8 ? quantize_act(a1.x, a1.M, a1.K) : QAct{};
  at::parallel_for(0, a1.N, grain(a1.N), [&](int64_t n0, int64_t n1) {
    if (q8) {
      q8_rows(a1, qa, n0, n1);
      q8_rows(a2, qa, n0, n1);
    } else {
      rows_any(a1, t, n0, n1);
      rows_any(a2, t, n0, n1);
    }
    for (int64_t m = 0; m < a1.M; ++m)
      for (int64_t n = n0; n < n1; ++n) {
        const float g = a1.y[m * a1.N + n];
        a1.y[m * a1.N + n] = g / (1.f + std::exp(-g)) * a2.y[m * a1.N + n];
      }
  });
  return y;
}

// int8 (N, K) * scale (N) -> bf16 (N, K) in one pass (round to nearest even): the weights of a prefill GEMM.
T512 void dequant_rows512(const int8_t* q, const float* s, uint16_t* out, int64_t K, int64_t n0, int64_t n1) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  for (int64_t n = n0; n < n1; ++n) {
    const __m512 sv = _mm512_set1_ps(s[n]);
    const int8_t* src = q + n * K;
    uint16_t* dst = out + n * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512i b = _mm512_castps_si512(_mm512_mul_ps(load16(src + k), sv));
      b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(b, 16), one))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtepi32_epi16(b));
    }
    for (; k < K; ++k) dst[k] = at::BFloat16(static_cast<float>(src[k]) * s[n]).x;
  }
}

void dequant_rows(const int8_t* q, const float* s, uint16_t* out, int64_t K, int64_t n0, int64_t n1) {
  if (has_avx512()) return dequant_rows512(q, s, out, K, n0, n1);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) out[n * K + k] = at::BFloat16(static_cast<float>(q[n * K + k]) * s[n]).x;
}

at::Tensor dequant_bf16(const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& into) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "omnitalk.dequant_bf16: q must be a contiguous int8 (N, K) CPU tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0),
              "omnitalk.dequant_bf16: scale must be an (N,) tensor");
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  at::Tensor out;
  if (into.has_value()) {  // a reused buffer: fresh pages for every matrix cost as much as the widening
    TORCH_CHECK(into->scalar_type() == at::kBFloat16 && into->is_contiguous() && into->numel() >= q.numel(),
                "omnitalk.dequant_bf16: into must be a contiguous bf16 tensor of at least N * K elements");
    out = into->view(-1).narrow(0, 0, q.numel()).view(q.sizes());
  } else {
    out = at::empty(q.sizes(), q.options().dtype(at::kBFloat16));
  }
  const int64_t N = q.size(0), K = q.size(1);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { dequant_rows(qp, sp, op, K, n0, n1); });
  return out;
}

std::string isa() { return has_avx512() ? "avx512" : has_avx2() ? "avx2" : "none"; }

}  // namespace

TORCH_LIBRARY(omnitalk, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scale=None, Tensor? bias=None) -> Tensor");
  m.def("gemv_swiglu(Tensor x, Tensor w1, Tensor? s1, Tensor w2, Tensor? s2) -> Tensor");
  m.def("dequant_bf16(Tensor q, Tensor scale, Tensor(a!)? into=None) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("set_int8_activations(bool on) -> bool", &set_int8_activations);
  m.def("int8_activations() -> bool", &int8_activations);
}

TORCH_LIBRARY_IMPL(omnitalk, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("gemv_swiglu", gemv_swiglu);
  m.impl("dequant_bf16", dequant_bf16);
}
