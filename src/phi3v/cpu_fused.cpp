// phi3v's fused elementwise steps of a layer, for AVX512 CPUs: RMSNorm, SwiGLU, CLIP's quick GELU and RoPE,
// each one pass over memory. Built with cpu_kernels.cpp into one module (cpu_kernels.py).
//
// Why they exist: with AMX or AVX512-BF16 matrix products, a prompt's layers spent 30-40% of their time
// outside the products (bench/prefill_floor.py), in the chains of eager ops these replace: quick GELU is
// three passes over a (crops x 577, 4096) tensor and RMSNorm five, each pass allocating a fresh tensor
// whose pages the kernel must fault in. Together those were 1.8 s of the 6.6 s of a 4-crop image prompt's
// layers on the AMX Xeon.
//
// Each reproduces the eager sequence it replaces rounding for rounding: every intermediate that PyTorch
// stores in the activation dtype (bfloat16 or float32) is rounded to it here too, to nearest even, so the
// results differ from PyTorch's only where its exp, or its order of summing a row, differs in float32's
// last bit (tests/test_cpu_fused.py measures how often a bf16 result then moves by one unit).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#define PHI3V_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

namespace {

// 16 floats of x from element i on; `m` says which of them exist (the rest read as 0).
PHI3V_AVX512 inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PHI3V_AVX512 inline __m512 load(const at::BFloat16* p, __mmask16 m) {  // a bfloat16 is a float's high half
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// v rounded to the nearest value of T, ties to even, as PyTorch converts float to bfloat16 (NaN stays NaN).
PHI3V_AVX512 inline __m512 round_to(const float*, __m512 v) { return v; }
PHI3V_AVX512 inline __m512 round_to(const at::BFloat16*, __m512 v) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  b = _mm512_and_si512(b, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(b);
}

// Stores v, already rounded to T by round_to.
PHI3V_AVX512 inline void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
PHI3V_AVX512 inline void store(at::BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

// Which of the 16 elements from i on exist in a row of n. (Loops, not lambdas, in the AVX512 functions:
// a lambda does not inherit its function's target attribute.)
inline __mmask16 lanes(int64_t i, int64_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

// e^x to about 2 ulp (Cephes' expf, as cpu_kernels.cpp's exp_nonpositive), over the whole float range:
// scalef writes 2^n into the result without overflowing the exponent bits, so e^x is inf past ln(FLT_MAX)
// and fades through the subnormals to 0, as PyTorch's exp; NaN stays NaN (the clamps return it).
PHI3V_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts, for precision
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// 1 / (1 + e^-x): torch.sigmoid's formula, saturating to 0 and 1 as it does.
PHI3V_AVX512 inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

void check_input(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), what, " must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32, what,
              " must be bfloat16 or float32");
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl"), "phi3v's fused kernels need AVX512 (F, BW, VL)");
}

// Calls f with x's data pointer typed by its dtype (float or at::BFloat16).
template <typename F>
void typed(const torch::Tensor& x, F&& f) {
  if (x.scalar_type() == torch::kFloat32)
    f(x.data_ptr<float>());
  else
    f(x.data_ptr<at::BFloat16>());
}

// Rows of x, split over PyTorch's threads in chunks of at least ~64 KiB of work.
template <typename F>
void by_rows(int64_t rows, int64_t row_elems, F&& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)), f);
}

template <typename T>
PHI3V_AVX512 void rms_norm_rows(const T* x, const T* w, T* out, int64_t C, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    const T* xr = x + r * C;
    T* o = out + r * C;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 16) {
      const __m512 v = load(xr + i, lanes(i, C));
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(C) + eps));
    for (int64_t i = 0; i < C; i += 16) {
      const __mmask16 m = lanes(i, C);
      const __m512 y = round_to(o, _mm512_mul_ps(load(xr + i, m), inv));  // normalised, cast back
      store(o + i, m, round_to(o, _mm512_mul_ps(load(w + i, m), y)));    // then scaled
    }
  }
}

template <typename T>
PHI3V_AVX512 void silu_mul_rows(const T* gu, T* out, int64_t I, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    const T *g = gu + r * 2 * I, *u = g + I;
    T* o = out + r * I;
    for (int64_t i = 0; i < I; i += 16) {
      const __mmask16 m = lanes(i, I);
      const __m512 gv = load(g + i, m);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
      const __m512 s = round_to(o, _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));  // F.silu's formula
      store(o + i, m, round_to(o, _mm512_mul_ps(load(u + i, m), s)));
    }
  }
}

template <typename T>
PHI3V_AVX512 void quick_gelu_span(T* x, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = lanes(i, end);
    T* p = x + i;
    const __m512 v = load(p, m);
    const __m512 s = round_to(p, sigmoid16(round_to(p, _mm512_mul_ps(v, _mm512_set1_ps(1.702f)))));
    store(p, m, round_to(p, _mm512_mul_ps(v, s)));
  }
}

// Rows r0..r1 of x (B * T rows of W): head h of a row rotated into out's (B, heads, T, D) layout.
template <typename T>
PHI3V_AVX512 void rope_rows(const T* x, const T* cos, const T* sin, T* out, int64_t T_len, int64_t W, int64_t heads,
                            int64_t D, int64_t r0, int64_t r1) {
  const int64_t half = D / 2;
  for (int64_t r = r0; r < r1; r++) {
    const T *c = cos + r * D, *s = sin + r * D;
    const int64_t b = r / T_len, t = r % T_len;
    for (int64_t h = 0; h < heads; h++) {
      const T* a = x + r * W + h * D;
      const T* bh = a + half;
      T* o = out + ((b * heads + h) * T_len + t) * D;
      for (int64_t i = 0; i < half; i += 16) {  // [a, b] -> [a cos - b sin, b cos + a sin], each product rounded
        const __mmask16 m = lanes(i, half);
        const __m512 av = load(a + i, m), bv = load(bh + i, m);
        const __m512 neg_b = _mm512_sub_ps(_mm512_setzero_ps(), bv);
        const __m512 lo = _mm512_add_ps(round_to(o, _mm512_mul_ps(av, load(c + i, m))),
                                        round_to(o, _mm512_mul_ps(neg_b, load(s + i, m))));
        const __m512 hi = _mm512_add_ps(round_to(o, _mm512_mul_ps(bv, load(c + half + i, m))),
                                        round_to(o, _mm512_mul_ps(av, load(s + half + i, m))));
        store(o + i, m, round_to(o, lo));
        store(o + half + i, m, round_to(o, hi));
      }
    }
  }
}

}  // namespace

// weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) over the last dimension, in float32 (spec §3.2).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_input(x, "x");
  check_input(weight, "weight");
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == C,
              "weight must be (C) in x's dtype");
  auto out = torch::empty_like(x);
  typed(x, [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    by_rows(x.numel() / C, C, [&](int64_t r0, int64_t r1) {
      rms_norm_rows(xp, wp, op, C, static_cast<float>(eps), r0, r1);
    });
  });
  return out;
}

// up * silu(gate) for gate_up = [gate; up] along the last dimension (the MLP's fused projection, spec §3.4).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_input(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "gate_up's last dimension must be even");
  const int64_t I = gate_up.size(-1) / 2;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  typed(gate_up, [&](auto* gp) {
    using T = std::remove_pointer_t<decltype(gp)>;
    T* op = out.data_ptr<T>();
    by_rows(out.numel() / std::max<int64_t>(I, 1), 3 * I, [&](int64_t r0, int64_t r1) {
      silu_mul_rows(gp, op, I, r0, r1);
    });
  });
  return out;
}

// x * sigmoid(1.702 x), in place (CLIP's activation, spec §4.2). Returns x.
torch::Tensor quick_gelu_(torch::Tensor x) {
  check_input(x, "x");
  typed(x, [&](auto* xp) {
    at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) { quick_gelu_span(xp, begin, end); });
  });
  return x;
}

// The rotated queries and keys, (B, q_heads, T, D) and (B, kv_heads, T, D), from the first q_heads + kv_heads
// heads of head_dim D of every row of x (B, T, W): the front of the fused QKV projection's output (spec §3.3,
// §3.5). Written head-major, where SDPA reads them faster than as views of x. cos, sin: (B, 1, T, D) tables
// in x's dtype.
std::vector<torch::Tensor> rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t q_heads,
                                int64_t kv_heads, int64_t D) {
  check_input(x, "x");
  check_input(cos, "cos");
  check_input(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && D % 2 == 0 && q_heads > 0 && kv_heads > 0 && (q_heads + kv_heads) * D <= x.size(2),
              "x must be (B, T, W) with W >= (q_heads + kv_heads) * D");
  const int64_t B = x.size(0), T = x.size(1), W = x.size(2);
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
              cos.numel() == B * T * D && cos.size(0) == B && cos.size(-1) == D && cos.sizes() == sin.sizes(),
              "cos and sin must be (B, 1, T, D) in x's dtype");
  auto q = torch::empty({B, q_heads, T, D}, x.options()), k = torch::empty({B, kv_heads, T, D}, x.options());
  typed(x, [&](auto* xp) {
    using E = std::remove_pointer_t<decltype(xp)>;
    const E *cp = cos.data_ptr<E>(), *sp = sin.data_ptr<E>();
    E *qp = q.data_ptr<E>(), *kp = k.data_ptr<E>();
    by_rows(B * T, (q_heads + kv_heads) * D, [&](int64_t r0, int64_t r1) {
      rope_rows(xp, cp, sp, qp, T, W, q_heads, D, r0, r1);
      rope_rows(xp + q_heads * D, cp, sp, kp, T, W, kv_heads, D, r0, r1);
    });
  });
  return {q, k};
}
