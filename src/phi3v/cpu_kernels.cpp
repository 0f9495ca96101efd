// phi3v's CPU kernels for one row of activations (batch-1 decoding) times a bf16, int8 or int4 weight, for
// x86-64 CPUs with AVX2 and FMA. Built at first use by phi3v/cpu_kernels.py.
//
// Why they exist: on CPUs without AVX512 PyTorch's kernels for these (bf16 F.linear, _weight_int8pack_mm,
// _weight_int4pack_mm_for_cpu) are compute-bound, and the int ones want bfloat16 activations; these read
// the same weight layouts, keep the activations in float32 and run 1.4-2.5x faster (bench/kernels.py).
// All split the output rows over PyTorch's own thread pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// 8 int8 codes at p as 8 float32 lanes.
inline __m256 int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// 8 bfloat16 at p as 8 float32 lanes: a bfloat16 is the high half of a float32.
inline __m256 bf16x8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 8 uint8 at p as 8 int32 lanes.
inline __m256i uint8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

void check(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be one contiguous float32 row");
  TORCH_CHECK(w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(), "CPU tensors expected");
}

}  // namespace

// y[n] = scale[n] * sum_k x[k] w[n, k] for a row-major (N, K) weight of bfloat16 (no scale) or int8 codes
// (a float32 scale per row). Needs N % 4 == 0, K % 8 == 0.
template <typename T, __m256 (*load8)(const T*)>
torch::Tensor rowwise_gemv(const torch::Tensor& x, const torch::Tensor& w, const float* scales) {
  check(x, w);
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && N % 4 == 0 && K % 8 == 0, "weight shape not handled");
  auto y = torch::empty({1, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  // Four weight rows at a time share each load of x.
  at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * 4; n < end * 4; n += 4) {
      const T* r = wp + n * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xp + k);
        a0 = _mm256_fmadd_ps(load8(r + k), xv, a0);
        a1 = _mm256_fmadd_ps(load8(r + K + k), xv, a1);
        a2 = _mm256_fmadd_ps(load8(r + 2 * K + k), xv, a2);
        a3 = _mm256_fmadd_ps(load8(r + 3 * K + k), xv, a3);
      }
      const float sums[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int i = 0; i < 4; i++) yp[n + i] = scales ? sums[i] * scales[n + i] : sums[i];
    }
  });
  return y;
}

torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "bfloat16 weight expected");
  return rowwise_gemv<at::BFloat16, bf16x8>(x, w, nullptr);
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kFloat32 &&
              scales.is_contiguous() && scales.numel() == q.size(0), "int8 codes and float32 row scales expected");
  return rowwise_gemv<int8_t, int8x8>(x, q, scales.data_ptr<float>());
}

// y[n] = sum_k x[k] w[n, k] with w = (q - 8) * scale + zero per group of `group` inputs.
// q is PyTorch's AVX2 int4 layout, (N, K / 2) uint8 in blocks of 32 output rows: for block b and input k,
// 16 bytes whose low nibbles are rows 32b + 0..15 and high nibbles rows 32b + 16..31.
// sz is (K / group, N, 2) bfloat16 (scale, zero), as the PyTorch kernel takes it.
// Per group: sum_k x_k w_nk = scale * sum_k x_k q_nk + (zero - 8 scale) * sum_k x_k, so the inner loop
// multiplies codes only. Needs N % 32 == 0 and an even group.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor sz, int64_t group) {
  check(x, q);
  const int64_t K = x.size(1), N = q.size(0), G = K / group;
  TORCH_CHECK(q.size(1) * 2 == K && N % 32 == 0 && group % 2 == 0 && K % group == 0);
  TORCH_CHECK(sz.is_contiguous() && sz.scalar_type() == torch::kBFloat16 && sz.size(0) == G && sz.size(1) == N);
  auto y = torch::empty({1, N}, x.options());
  const auto xsum = x.view({G, group}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int32_t* szp = reinterpret_cast<const int32_t*>(sz.data_ptr<at::BFloat16>());  // (scale, zero) pairs
  float* yp = y.data_ptr<float>();
  const __m256i nibble = _mm256_set1_epi32(15), high_half = _mm256_set1_epi32(0xFFFF0000);
  const __m256 eight = _mm256_set1_ps(8.f);
  at::parallel_for(0, N / 32, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t g = 0; g < G; g++) {
        const uint8_t* p = qp + (b * K + g * group) * 16;
        const float* xg = xp + g * group;
        // Two inputs per iteration, each with its own accumulators, to hide the FMA latency.
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 c[4] = {a[0], a[0], a[0], a[0]};
        for (int64_t k = 0; k < group; k += 2, p += 32) {
          const __m256 x0 = _mm256_set1_ps(xg[k]), x1 = _mm256_set1_ps(xg[k + 1]);
          const __m256i u0 = uint8x8(p), u1 = uint8x8(p + 8), v0 = uint8x8(p + 16), v1 = uint8x8(p + 24);
          a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(u0, nibble)), x0, a[0]);
          a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(u1, nibble)), x0, a[1]);
          a[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(u0, 4)), x0, a[2]);
          a[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(u1, 4)), x0, a[3]);
          c[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, nibble)), x1, c[0]);
          c[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, nibble)), x1, c[1]);
          c[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), x1, c[2]);
          c[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), x1, c[3]);
        }
        const __m256 xsum_g = _mm256_set1_ps(xs[g]);
        const int32_t* pairs = szp + g * N + b * 32;
        for (int i = 0; i < 4; i++) {
          // A bfloat16 is the high half of a float32: the pair's low half is the scale, the high the zero.
          const __m256i sz8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + 8 * i));
          const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(sz8, 16));
          const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(sz8, high_half));
          out[i] = _mm256_fmadd_ps(scale, _mm256_add_ps(a[i], c[i]), out[i]);
          out[i] = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, scale, zero), xsum_g, out[i]);
        }
      }
      for (int i = 0; i < 4; i++) _mm256_storeu_ps(yp + b * 32 + 8 * i, out[i]);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "one float32 row times a bfloat16 weight");
  m.def("int8_gemv", &int8_gemv, "one float32 row times an int8 weight (per-row scales)");
  m.def("int4_gemv", &int4_gemv, "one float32 row times an int4 weight (PyTorch's AVX2 layout)");
}
