// phi3v's CPU kernels for one row of activations (batch-1 decoding) times a bf16, int8 or int4 weight, for
// x86-64 CPUs with AVX2 and FMA. Built at first use by phi3v/cpu_kernels.py.
//
// Why they exist: on CPUs without AVX512 PyTorch's kernels for these (bf16 F.linear, _weight_int8pack_mm,
// _weight_int4pack_mm_for_cpu) are compute-bound; these read the same weight layouts and run 1.2-2.5x
// faster (bench/linear_routes.py), the bf16 one at the speed of a plain read of the weight.
// The bf16 kernel keeps the activations in float32. The int8 and int4 ones quantize them to int8 in blocks
// of 32 (one float scale per block, as llama.cpp's Q8_0) and multiply integers with vpmaddubsw: converting
// every weight to float is what bounds a float kernel here. This adds about 0.5% relative error to a
// product, against 1% (int8) and 10% (int4) from the weights' own quantization.
// On AVX512 CPUs PyTorch's kernels are faster, and the variants marked with a target attribute take over
// where the CPU has the instructions (the Python side checks; each kernel checks again): AVX512-BF16 dot
// products for bf16 rows, AVX512-VNNI for int8 and for int4 in PyTorch's 64-row AVX512 layout. With a
// single instruction per cache line or two of weight, they read one row at a time at about the speed of
// a plain read (bench/linear_routes.py: 1.1-1.7x PyTorch's kernels there).
// All split the output rows over PyTorch's own thread pool (at::parallel_for).
//
// decode_attention is one decoding step's attention over the KV cache, which it reads in float32 or
// bfloat16 (a bf16 cache halves the bytes a step reads). PyTorch's SDPA reads a float32 cache at about
// two thirds of the speed of a plain read here, and a bf16 one only after widening it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// One row of activations as int8 codes in blocks of 32: x[k] ~= q[k] * d[k / 32]. sum[b] is the sum of
// block b's codes, xsum[b] the sum of its float32 inputs.
struct Q8Row {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> xsum;
};

Q8Row quantize_row(const float* x, int64_t K) {
  Q8Row r{std::vector<int8_t>(K), std::vector<float>(K / 32), std::vector<int32_t>(K / 32),
          std::vector<float>(K / 32)};
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < K / 32; b++) {
    const float* xb = x + b * 32;
    __m256 m = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 32; i += 8) {
      const __m256 v = _mm256_loadu_ps(xb + i);
      m = _mm256_max_ps(m, _mm256_and_ps(v, abs_mask));
      total = _mm256_add_ps(total, v);
    }
    r.xsum[b] = hsum(total);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float d = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.f;
    r.d[b] = d;
    const __m256 inv = _mm256_set1_ps(d > 0 ? 1.f / d : 0.f);
    __m256i v[4];
    for (int i = 0; i < 4; i++)  // cvtps rounds to nearest even, as torch.round does
      v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), inv));
    // The packs interleave 128-bit lanes; the permutation puts the 32 codes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r.q[b * 32]),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) sum += r.q[b * 32 + i];
    r.sum[b] = sum;
  }
  return r;
}

// e^x for x <= 0 (softmax after subtracting the maximum), to about 2 ulp: Cephes' expf. x = n ln2 + r
// with |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n written into the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));  // keeps 2^n normal; e^-87.3 is 1e-38, nothing next to e^0
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts, for precision
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {  // a bfloat16 is the high half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Asks for the two cache lines `ahead` bytes past p: a loop round's 128 bytes of a weight row. The AVX512
// kernels read each thread's share of a weight as one stream, and on the Intel Xeon the hardware prefetcher
// alone keeps too few of its lines in flight (cpu_kernels.prefetch_bytes has the figures); on the AMD EPYC,
// asking 512-4096 bytes ahead made the int4 kernel 1-9% slower, so the distance is the caller's choice, 0
// for none. The kernels take that choice as a template flag: with a run-time `if (ahead)` in here, GCC 12
// dropped the prefetches altogether.
inline void prefetch_lines(const void* p, int64_t ahead) {
  const char* c = static_cast<const char*>(p) + ahead;
  _mm_prefetch(c, _MM_HINT_T0);
  _mm_prefetch(c + 64, _MM_HINT_T0);
}

// Runs f(std::true_type) when prefetch > 0, else f(std::false_type): one instance of a kernel per choice.
template <typename F>
inline void with_prefetch(int64_t prefetch, F&& f) {
  if (prefetch > 0)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// With kPrefetch, asks for the cache lines of the `bytes`-long row `ahead` bytes past r.
template <bool kPrefetch>
inline void prefetch_row(const void* r, int64_t bytes, int64_t ahead) {
  if constexpr (kPrefetch)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(r) + ahead + b, _MM_HINT_T0);
}

constexpr int64_t kMaxHeadDim = 256;

// out = softmax(q . k_s * scale over s < len) . v for one head: q, out (D) float32, k and v (len, D) rows.
// scores is scratch for len floats. Needs D % 8 == 0, D <= kMaxHeadDim.
template <typename T>
void attend_head(const float* q, const T* k, const T* v, int64_t len, int64_t D, float scale, float* scores,
                 float* out) {
  const int64_t C = D / 8;
  __m256 qs[kMaxHeadDim / 8], acc[kMaxHeadDim / 8];
  for (int64_t c = 0; c < C; c++) qs[c] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * c), _mm256_set1_ps(scale));
  float top = -INFINITY;
  for (int64_t s = 0; s < len; s++) {
    const T* ks = k + s * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains hide the FMA latency
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      a0 = _mm256_fmadd_ps(load8(ks + 8 * c), qs[c], a0);
      a1 = _mm256_fmadd_ps(load8(ks + 8 * c + 8), qs[c + 1], a1);
    }
    if (c < C) a0 = _mm256_fmadd_ps(load8(ks + 8 * c), qs[c], a0);
    scores[s] = hsum(_mm256_add_ps(a0, a1));
    top = std::max(top, scores[s]);
  }
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= len; s += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), top8));
    _mm256_storeu_ps(scores + s, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = hsum(total8);
  for (; s < len; s++) total += (scores[s] = std::exp(scores[s] - top));
  for (int64_t c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
  for (s = 0; s < len; s++) {
    const __m256 p = _mm256_set1_ps(scores[s]);
    const T* vs = v + s * D;
    for (int64_t c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(load8(vs + 8 * c), p, acc[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (int64_t c = 0; c < C; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inv));
}

#define PHI3V_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

static inline PHI3V_AVX512 __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline PHI3V_AVX512 __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// attend_head on AVX512 CPUs, for D % 16 == 0: the same math on 512-bit registers, eight keys a round in
// the scores (eight independent sums; one key at a time waited on its own chain of FMAs, and the kernel
// read a cold cache at 15 GB/s while the weight kernels read at 26) and two in the weighted sum of values.
// With kPrefetch, asks for the rows `ahead` bytes past those in use, as the weight kernels do.
template <bool kPrefetch, typename T>
static PHI3V_AVX512 void attend_head_avx512(const float* q, const T* k, const T* v, int64_t len, int64_t D,
                                            float scale, int64_t ahead, float* scores, float* out) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  auto prefetch = [&](const T* r) { prefetch_row<kPrefetch>(r, row_bytes, ahead); };
  const int64_t C = D / 16;
  __m512 qs[kMaxHeadDim / 16], acc[kMaxHeadDim / 16], acc2[kMaxHeadDim / 16];
  for (int64_t c = 0; c < C; c++) qs[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
  float top = -INFINITY;
  int64_t s = 0;
  for (; s + 8 <= len; s += 8) {
    __m512 a[8];
    for (auto& x : a) x = _mm512_setzero_ps();
    for (int j = 0; j < 8; j++) prefetch(k + (s + j) * D);
    for (int64_t c = 0; c < C; c++)
      for (int j = 0; j < 8; j++) a[j] = _mm512_fmadd_ps(load16(k + (s + j) * D + 16 * c), qs[c], a[j]);
    for (int j = 0; j < 8; j++) {
      scores[s + j] = _mm512_reduce_add_ps(a[j]);
      top = std::max(top, scores[s + j]);
    }
  }
  for (; s < len; s++) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c++) a0 = _mm512_fmadd_ps(load16(k + s * D + 16 * c), qs[c], a0);
    scores[s] = _mm512_reduce_add_ps(a0);
    top = std::max(top, scores[s]);
  }
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  for (s = 0; s + 8 <= len; s += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), top8));
    _mm256_storeu_ps(scores + s, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = hsum(total8);
  for (; s < len; s++) total += (scores[s] = std::exp(scores[s] - top));
  for (int64_t c = 0; c < C; c++) acc[c] = acc2[c] = _mm512_setzero_ps();
  for (s = 0; s + 2 <= len; s += 2) {
    const __m512 p0 = _mm512_set1_ps(scores[s]), p1 = _mm512_set1_ps(scores[s + 1]);
    const T *v0 = v + s * D, *v1 = v0 + D;
    prefetch(v0);
    prefetch(v1);
    for (int64_t c = 0; c < C; c++) {
      acc[c] = _mm512_fmadd_ps(load16(v0 + 16 * c), p0, acc[c]);
      acc2[c] = _mm512_fmadd_ps(load16(v1 + 16 * c), p1, acc2[c]);
    }
  }
  if (s < len) {
    const __m512 p0 = _mm512_set1_ps(scores[s]);
    for (int64_t c = 0; c < C; c++) acc[c] = _mm512_fmadd_ps(load16(v + s * D + 16 * c), p0, acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(acc[c], acc2[c]), inv));
}

void check(const torch::Tensor& x, const torch::Tensor& w, bool bf16_ok = false) {
  const bool dtype_ok = x.scalar_type() == torch::kFloat32 || (bf16_ok && x.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && dtype_ok && x.is_contiguous(),
              bf16_ok ? "x must be one contiguous float32 or bfloat16 row" : "x must be one contiguous float32 row");
  TORCH_CHECK(w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(), "CPU tensors expected");
}

// The quantized kernels take a float32 or a bfloat16 row (a bf16 model's activations, which would
// otherwise cost a conversion each way per product in Python) and quantize it from float32.
Q8Row quantize_row(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kFloat32) return quantize_row(x.data_ptr<float>(), x.size(1));
  const at::BFloat16* b = x.data_ptr<at::BFloat16>();
  std::vector<float> wide(x.size(1));
  for (int64_t k = 0; k < x.size(1); k++) wide[k] = static_cast<float>(b[k]);
  return quantize_row(wide.data(), x.size(1));
}

// A kernel's float32 output in x's dtype (rounded to nearest even, as Tensor.to does).
torch::Tensor like_x(const torch::Tensor& y, const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

// The int8 kernels' operands: int8 codes (N, K) with a float32 scale per row.
void check_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales) {
  check(x, q, true);
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kFloat32 &&
              scales.is_contiguous() && scales.numel() == q.size(0), "int8 codes and float32 row scales expected");
  TORCH_CHECK(q.size(1) == x.size(1) && x.size(1) % 32 == 0, "weight shape not handled");
}

// The (scale, zero) bfloat16 pairs of the 64-row int4 kernels: (N / 64, K / group, 64, 2), each row block's
// pairs together. In PyTorch's (K / group, N, 2) order a block read its groups' pairs N * 4 bytes apart,
// and with the weights in 2 MiB pages those reads met in the same cache sets: Phi-3-V's decode steps got
// longer than from 4 KiB pages, not 11% shorter as in this order (AMX Xeon, bench/hugepages.py).
void check_blocked_pairs(const torch::Tensor& sz, int64_t N, int64_t K, int64_t group) {
  TORCH_CHECK(sz.is_contiguous() && sz.scalar_type() == torch::kBFloat16 && sz.dim() == 4 && sz.size(0) == N / 64 &&
              sz.size(1) == K / group && sz.size(2) == 64 && sz.size(3) == 2,
              "(N / 64, K / group, 64, 2) bfloat16 scales and zeros expected");
}

// The int4 kernels' operands: codes in PyTorch's CPU layout with blocks of `rows` output rows, and
// (scale, zero) pairs: (K / group, N, 2) for 32-row blocks, blocked (check_blocked_pairs) for 64.
void check_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& sz, int64_t group, int64_t rows) {
  check(x, q, true);
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) * 2 == K && N % rows == 0 && group % 32 == 0 && K % group == 0, "weight shape not handled");
  if (rows == 64)
    check_blocked_pairs(sz, N, K, group);
  else
    TORCH_CHECK(sz.is_contiguous() && sz.scalar_type() == torch::kBFloat16 && sz.size(0) == K / group && sz.size(1) == N);
}

// The sum of the float32 x over each group of `group` inputs, from its per-32 block sums.
std::vector<float> group_sums(const Q8Row& xq, int64_t K, int64_t group) {
  std::vector<float> sums(K / group, 0.f);
  for (int64_t blk = 0; blk < K / 32; blk++) sums[blk * 32 / group] += xq.xsum[blk];
  return sums;
}

// Eight (scale, zero) bfloat16 pairs as two float32 vectors: a bfloat16 is the high half of a float32,
// and a pair's low half is the scale, its high half the zero.
inline void split_pairs(__m256i pairs, __m256& scale, __m256& zero) {
  scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF0000)));
}

// Runs rows(R, n) over output rows n..n+R-1 of an N-row product, N % 4 == 0: R = 8 split over the threads,
// then R = 4 for the last four where N % 8 == 4. R is a compile-time constant, so rows' loops unroll.
template <typename F>
inline void in_eights(int64_t N, F&& rows) {
  at::parallel_for(0, N / 8, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * 8; n < end * 8; n += 8) rows(std::integral_constant<int, 8>(), n);
  });
  if (N % 8) rows(std::integral_constant<int, 4>(), N - 4);
}

}  // namespace

// y[n] = sum_k x[k] w[n, k] for a row-major (N, K) bfloat16 weight. Needs N % 4 == 0, K % 16 == 0.
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  check(x, w);
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "bfloat16 weight expected");
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && N % 4 == 0 && K % 16 == 0, "weight shape not handled");
  // A 32-bit lane of the weight holds two bfloat16, inputs k (low half) and k + 1 (high half), each the
  // high half of its float32: a shift and a mask give them. x is reordered to match: per 16 inputs, the
  // even ones then the odd ones.
  std::vector<float> xe(K);
  const float* x0 = x.data_ptr<float>();
  for (int64_t k = 0; k < K; k += 16)
    for (int j = 0; j < 8; j++) xe[k + j] = x0[k + 2 * j], xe[k + 8 + j] = x0[k + 2 * j + 1];
  auto y = torch::empty({1, N}, x.options().dtype(torch::kFloat32));
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const __m256i high_half = _mm256_set1_epi32(0xFFFF0000);
  // Eight weight rows at a time share each load of x (then four for the last rows where N % 8 == 4); two
  // accumulators per row hide the FMA latency. Eight rows read Phi-3-V's weights 6-7% faster than four on
  // the AVX2 EPYC (Zen 3), though their 16 accumulators and the two x vectors do not all fit in registers.
  const auto rows = [&](auto R, int64_t n) {
    const at::BFloat16* r = wp + n * K;
    __m256 a[2 * R];
    for (auto& v : a) v = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 x_even = _mm256_loadu_ps(&xe[k]), x_odd = _mm256_loadu_ps(&xe[k + 8]);
      for (int i = 0; i < R; i++) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i * K + k));
        a[2 * i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), x_even, a[2 * i]);
        a[2 * i + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(h, high_half)), x_odd, a[2 * i + 1]);
      }
    }
    for (int i = 0; i < R; i++) yp[n + i] = hsum(_mm256_add_ps(a[2 * i], a[2 * i + 1]));
  };
  in_eights(N, rows);
  return y;
}

// The same for a bfloat16 row x on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 bfloat16 pairs into 16
// float32 sums, exactly (a product of two bfloat16 fits a float32), so one instruction consumes a cache
// line of the weight and the kernel runs at the speed of reading it. One row at a time (a single stream
// per thread) read 10-25% faster here than four interleaved rows. Needs K % 32 == 0.
#define PHI3V_AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))

template <bool kPrefetch>
static PHI3V_AVX512BF16 void bf16_rows_avx512(const at::BFloat16* w, const at::BFloat16* x, int64_t K,
                                              int64_t n0, int64_t n1, int64_t prefetch, float* y) {
  for (int64_t n = n0; n < n1; n++) {
    const at::BFloat16* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  // two chains hide the latency
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      if constexpr (kPrefetch) prefetch_lines(r + k, prefetch);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    if (k < K) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

torch::Tensor bf16_gemv_avx512(torch::Tensor x, torch::Tensor w, int64_t prefetch) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
              "x must be one contiguous bfloat16 row");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == torch::kBFloat16 && x.device().is_cpu() && w.device().is_cpu(),
              "a contiguous bfloat16 CPU weight expected");
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 32 == 0, "weight shape not handled");
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "bf16_gemv_avx512 needs AVX512-BF16");
  auto y = torch::empty({1, N}, x.options().dtype(torch::kFloat32));
  const at::BFloat16 *wp = w.data_ptr<at::BFloat16>(), *xp = x.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    with_prefetch(prefetch, [&](auto on) { bf16_rows_avx512<decltype(on)::value>(wp, xp, K, begin, end, prefetch, yp); });
  });
  return y;
}

// y[n] = scale[n] * sum_k x[k] q[n, k] for row-major (N, K) int8 codes and a float32 scale per row, x
// quantized to int8 (Q8Row). Needs N % 4 == 0, K % 32 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  check_int8(x, q, scales);
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(N % 4 == 0, "weight shape not handled");
  const Q8Row xq = quantize_row(x);
  auto y = torch::empty({1, N}, x.options().dtype(torch::kFloat32));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256i ones = _mm256_set1_epi16(1);
  // Eight rows at a time (four for the last rows where N % 8 == 4), as bf16_gemv reads its weight.
  const auto rows = [&](auto R, int64_t n) {
    const int8_t* r = qp + n * K;
    __m256 a[R];
    for (auto& v : a) v = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; b++) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&xq.q[b * 32]));
      const __m256 d = _mm256_set1_ps(xq.d[b]);
      for (int i = 0; i < R; i++) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i * K + b * 32));
        // vpmaddubsw multiplies unsigned by signed bytes: |w| times x with w's sign (codes are in
        // -127..127, so |w| fits and no pair sum saturates).
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d, a[i]);
      }
    }
    for (int i = 0; i < R; i++) yp[n + i] = hsum(a[i]) * sp[n + i];
  };
  in_eights(N, rows);
  return like_x(y, x);
}

// The same on CPUs with AVX512-VNNI: vpdpbusd sums the four byte products of each 32-bit lane straight
// into an int32 (|w| times x with w's sign, as above), one row at a time: 1.6x int8_gemv's speed here,
// at the speed of reading the weight. Needs K % 32 == 0.
#define PHI3V_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

// acc + d[b] * (sum over input block b of x8 * w) for weight row r.
static inline PHI3V_VNNI __m256 int8_block_vnni(const int8_t* r, const Q8Row& xq, int64_t b, __m256 acc) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 32 * b));
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&xq.q[32 * b]));
  const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xq.d[b]), acc);
}

template <bool kPrefetch>
static PHI3V_VNNI void int8_rows_vnni(const int8_t* q, const Q8Row& xq, const float* scales, int64_t K,
                                      int64_t n0, int64_t n1, int64_t prefetch, float* y) {
  const int64_t B = K / 32;
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* r = q + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains hide the FMA latency
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) {  // two cache lines of the weight a round
      if constexpr (kPrefetch) prefetch_lines(r + 32 * b, prefetch);
      a0 = int8_block_vnni(r, xq, b, a0);
      a1 = int8_block_vnni(r, xq, b + 1, a1);
      a0 = int8_block_vnni(r, xq, b + 2, a0);
      a1 = int8_block_vnni(r, xq, b + 3, a1);
    }
    for (; b + 2 <= B; b += 2) {
      a0 = int8_block_vnni(r, xq, b, a0);
      a1 = int8_block_vnni(r, xq, b + 1, a1);
    }
    if (b < B) a0 = int8_block_vnni(r, xq, b, a0);
    y[n] = hsum(_mm256_add_ps(a0, a1)) * scales[n];
  }
}

torch::Tensor int8_gemv_vnni(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t prefetch) {
  check_int8(x, q, scales);
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"),
              "int8_gemv_vnni needs AVX512-VNNI");
  const Q8Row xq = quantize_row(x);
  auto y = torch::empty({1, N}, x.options().dtype(torch::kFloat32));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    with_prefetch(prefetch, [&](auto on) { int8_rows_vnni<decltype(on)::value>(qp, xq, sp, K, begin, end, prefetch, yp); });
  });
  return like_x(y, x);
}

// y[n] = sum_k x[k] w[n, k] with w = (q - 8) * scale + zero per group of `group` inputs.
// q is PyTorch's AVX2 int4 layout, (N, K / 2) uint8 in blocks of 32 output rows: for block b and input k,
// 16 bytes whose low nibbles are rows 32b + 0..15 and high nibbles rows 32b + 16..31.
// sz is (K / group, N, 2) bfloat16 (scale, zero), as the PyTorch kernel takes it.
// Per group: sum_k x_k w_nk = scale * sum_k x_k (q_nk - 8) + zero * sum_k x_k. The first sum runs on
// int8 x (Q8Row), the second on the float32 x. Needs N % 32 == 0, group % 32 == 0.
// vpmaddubsw multiplies adjacent byte pairs, so each pair must hold one row's codes for two inputs. Inputs
// k and k + 2 are 32 bytes apart and in the same 128-bit lane position, so one in-lane vpunpck{l,h}bw of
// the 64 bytes of inputs k..k+3 pairs them (and k + 1 with k + 3 in the high lanes); the high lanes'
// sums are added to the low ones once per block of 32 inputs. Interleaving the 32 bytes of inputs k and
// k + 1 instead (a cross-lane vpermq and a vpshufb per 32 bytes) ran 1.4x slower on the AMD EPYC (Zen 3),
// where it made the kernel compute-bound at 17.5 GB/s of codes on 2 threads.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor sz, int64_t group) {
  check_int4(x, q, sz, group, 32);
  const int64_t K = x.size(1), N = q.size(0), G = K / group;
  const Q8Row xq = quantize_row(x);
  const std::vector<float> xsums = group_sums(xq, K, group);  // shared by all row blocks
  // Per 4 inputs, the multipliers of that 64-byte step: (x_k, x_k+2) in the low lane, (x_k+1, x_k+3) in the high.
  std::vector<__m256i> xv(K / 4);
  const auto pair = [](int8_t a, int8_t b) { return static_cast<int16_t>((a & 0xFF) | (b << 8)); };
  for (int64_t i = 0; i < K / 4; i++) {
    const int8_t* c = &xq.q[4 * i];
    xv[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(pair(c[0], c[2]))),
                                    _mm_set1_epi16(pair(c[1], c[3])), 1);
  }
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int32_t* szp = reinterpret_cast<const int32_t*>(sz.data_ptr<at::BFloat16>());  // (scale, zero) pairs
  auto y = torch::empty({1, N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  const __m256i nibbles = _mm256_set1_epi8(15);
  // The int16 sums of a lane's 8 pairs as int32, the high lane's added to the low one.
  const auto widen = [](__m256i v) {
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
  };
  at::parallel_for(0, N / 32, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      __m256 out[4];
      for (auto& v : out) v = _mm256_setzero_ps();
      const uint8_t* p = qp + b * K * 16;
      for (int64_t g = 0; g < G; g++) {
        __m256 a[4];  // sum_k x_k (q_k - 8) for rows 0-7, 8-15, 16-23, 24-31 of the block
        for (auto& v : a) v = _mm256_setzero_ps();
        for (int64_t blk = g * group / 32; blk < (g + 1) * group / 32; blk++) {
          // Rows 0-7 and 8-15 (low nibbles of the low and high unpack), 16-23 and 24-31 (high nibbles).
          // int16 sums of 8 pairs: 8 * 2 * 15 * 127 < 32768.
          __m256i s[4];
          for (auto& v : s) v = _mm256_setzero_si256();
          const __m256i* xb = &xv[blk * 8];
          for (int j = 0; j < 8; j++, p += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(p) + 1536, _MM_HINT_T0);  // one stream per block
            const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
            const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
            const __m256i lo = _mm256_unpacklo_epi8(v0, v1), hi = _mm256_unpackhi_epi8(v0, v1);
            s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(_mm256_and_si256(lo, nibbles), xb[j]));
            s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(_mm256_and_si256(hi, nibbles), xb[j]));
            s[2] = _mm256_add_epi16(s[2], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(lo, 4), nibbles), xb[j]));
            s[3] = _mm256_add_epi16(s[3], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 4), nibbles), xb[j]));
          }
          const __m256 d = _mm256_set1_ps(xq.d[blk]);
          const __m256i eight_sum = _mm256_set1_epi32(8 * xq.sum[blk]);
          for (int i = 0; i < 4; i++)
            a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(widen(s[i]), eight_sum)), d, a[i]);
        }
        const __m256 xsum_g = _mm256_set1_ps(xsums[g]);
        const int32_t* sz_pairs = szp + g * N + b * 32;
        for (int i = 0; i < 4; i++) {
          __m256 scale, zero;
          split_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz_pairs + 8 * i)), scale, zero);
          out[i] = _mm256_fmadd_ps(zero, xsum_g, _mm256_fmadd_ps(scale, a[i], out[i]));
        }
      }
      for (int i = 0; i < 4; i++) _mm256_storeu_ps(yp + b * 32 + 8 * i, out[i]);
    }
  });
  return like_x(y, x);
}

// The same product for PyTorch's AVX512 int4 layout: blocks of 64 output rows, and for block b and input k
// 32 bytes whose low nibbles are rows 64b + 0..31 and high nibbles rows 64b + 32..63. AVX512-VNNI's
// vpdpbusd multiplies four unsigned codes by four signed int8 inputs and sums them into an int32, so
// four inputs k..k+3 of a row must share a 32-bit lane: two rounds of byte/word unpacking build those
// quads from four 32-byte columns.
// Accumulator i of int4_b64_block holds rows base(i) + 0..3 (low 128-bit lane) and base(i) + 16..19 (high
// lane), the order the unpacking leaves them in: base = 0, 4, 8, 12 for the low nibbles, 32 more for the high.
constexpr int b64_base(int i) { return (i / 4) * 32 + (i % 4) * 4; }

// Output rows 64b..64b+63 (yb) from the block's codes p (K * 32 bytes), as int4_gemv does for 32 rows.
template <bool kPrefetch>
static PHI3V_VNNI void int4_b64_block(const uint8_t* p, const Q8Row& xq, const float* xsums, const int32_t* szp,
                                      int64_t K, int64_t group, int64_t b, int64_t prefetch, float* yb) {
  const __m256i nibbles = _mm256_set1_epi8(15);
  const int32_t* xquads = reinterpret_cast<const int32_t*>(xq.q.data());  // (x_k .. x_k+3) byte quads
  __m256 out[8];
  for (auto& v : out) v = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / group; g++) {
    __m256 a[8];  // sum_k x_k (q_k - 8), per accumulator's rows
    for (auto& v : a) v = _mm256_setzero_ps();
    for (int64_t blk = g * group / 32; blk < (g + 1) * group / 32; blk++) {
      __m256i s[8];
      for (auto& v : s) v = _mm256_setzero_si256();
      for (int j = 0; j < 8; j++, p += 128) {
        if constexpr (kPrefetch) prefetch_lines(p, prefetch);
        const __m256i xv = _mm256_set1_epi32(xquads[blk * 8 + j]);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
        const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96));
        const __m256i t0 = _mm256_unpacklo_epi8(v0, v1), t1 = _mm256_unpackhi_epi8(v0, v1);
        const __m256i t2 = _mm256_unpacklo_epi8(v2, v3), t3 = _mm256_unpackhi_epi8(v2, v3);
        const __m256i u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2),
                              _mm256_unpacklo_epi16(t1, t3), _mm256_unpackhi_epi16(t1, t3)};
        for (int i = 0; i < 4; i++) {
          s[i] = _mm256_dpbusd_epi32(s[i], _mm256_and_si256(u[i], nibbles), xv);
          s[4 + i] = _mm256_dpbusd_epi32(s[4 + i], _mm256_and_si256(_mm256_srli_epi16(u[i], 4), nibbles), xv);
        }
      }
      const __m256 d = _mm256_set1_ps(xq.d[blk]);
      const __m256i eight_sum = _mm256_set1_epi32(8 * xq.sum[blk]);
      for (int i = 0; i < 8; i++)
        a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[i], eight_sum)), d, a[i]);
    }
    const __m256 xsum_g = _mm256_set1_ps(xsums[g]);
    const int32_t* sz_pairs = szp + (b * (K / group) + g) * 64;  // (scale, zero) pairs of the block's rows
    for (int i = 0; i < 8; i++) {
      const int32_t* r = sz_pairs + b64_base(i);
      __m256 scale, zero;
      split_pairs(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r))),
                                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16)), 1),
                  scale, zero);
      out[i] = _mm256_fmadd_ps(zero, xsum_g, _mm256_fmadd_ps(scale, a[i], out[i]));
    }
  }
  for (int i = 0; i < 8; i++) {
    _mm_storeu_ps(yb + b64_base(i), _mm256_castps256_ps128(out[i]));
    _mm_storeu_ps(yb + b64_base(i) + 16, _mm256_extractf128_ps(out[i], 1));
  }
}

// Needs N % 64 == 0, group % 32 == 0, and a CPU with AVX512-VNNI.
torch::Tensor int4_gemv_b64(torch::Tensor x, torch::Tensor q, torch::Tensor sz, int64_t group, int64_t prefetch) {
  check_int4(x, q, sz, group, 64);
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"),
              "int4_gemv_b64 needs AVX512-VNNI");
  const Q8Row xq = quantize_row(x);
  const std::vector<float> xsums = group_sums(xq, K, group);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int32_t* szp = reinterpret_cast<const int32_t*>(sz.data_ptr<at::BFloat16>());
  auto y = torch::empty({1, N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / 64, 2, [&](int64_t begin, int64_t end) {
    with_prefetch(prefetch, [&](auto on) {
      for (int64_t b = begin; b < end; b++)
        int4_b64_block<decltype(on)::value>(qp + b * K * 32, xq, xsums.data(), szp, K, group, b, prefetch, yp + b * 64);
    });
  });
  return like_x(y, x);
}

// Prompts (many rows) multiply by a dequantized weight in a dense bf16 GEMM. These write rows lo..hi of an
// int8 weight (per-row scales) or of an int4 weight in PyTorch's AVX512 layout straight as bfloat16 into
// `out` (hi - lo, K): the float32 math of Int8Linear.dequantize / Int4Linear.dequantize (a multiply, then
// for int4 an add, each rounded), then rounded to nearest even, as Tensor.to(torch.bfloat16) does. At
// memory speed, against several float32 passes over each block in PyTorch.
static PHI3V_AVX512BF16 void store_bf16(at::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), (__m128i)_mm256_cvtneps_pbh(v));
}

static PHI3V_AVX512BF16 void dequant_int8_rows(const int8_t* q, const float* scales, int64_t K, int64_t r0,
                                               int64_t r1, int64_t lo, at::BFloat16* out) {
  for (int64_t n = r0; n < r1; n++) {
    const int8_t* r = q + n * K;
    at::BFloat16* o = out + (n - lo) * K;
    const __m256 s = _mm256_set1_ps(scales[n]);
    for (int64_t k = 0; k < K; k += 8) {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + k));
      store_bf16(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), s));
    }
  }
}

// One 64-row block: per 32 inputs, the codes are first spread into a row-major tile (the layout keeps an
// input's 64 rows together), then each row's 32 values are scaled.
static PHI3V_AVX512BF16 void dequant_int4_b64_block(const uint8_t* p, const int32_t* szp, int64_t K, int64_t group,
                                                    int64_t b, int64_t lo, at::BFloat16* out) {
  alignas(32) uint8_t tile[64][32];
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    for (int kk = 0; kk < 32; kk++) {
      const uint8_t* column = p + (k0 + kk) * 32;
      for (int j = 0; j < 32; j++) {
        tile[j][kk] = column[j] & 15;
        tile[32 + j][kk] = column[j] >> 4;
      }
    }
    const int32_t* pairs = szp + (b * (K / group) + k0 / group) * 64;  // (scale, zero) bfloat16 pairs
    for (int r = 0; r < 64; r++) {
      const uint32_t pair = static_cast<uint32_t>(pairs[r]);
      float scale, zero;
      const uint32_t scale_bits = pair << 16, zero_bits = pair & 0xFFFF0000u;
      std::memcpy(&scale, &scale_bits, 4);
      std::memcpy(&zero, &zero_bits, 4);
      const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero - 8.f * scale);  // (q - 8) s + zero
      at::BFloat16* o = out + (64 * b + r - lo) * K + k0;
      for (int c = 0; c < 32; c += 8) {
        const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&tile[r][c]));
        store_bf16(o + c, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), s), z));
      }
    }
  }
}

static void check_dequant_out(const torch::Tensor& out, int64_t rows, int64_t K) {
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
              out.size(1) == K, "out must be a contiguous (hi - lo, K) bfloat16 tensor");
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "the bfloat16 dequantizers need AVX512-BF16");
}

torch::Tensor dequantize_int8_bf16(torch::Tensor q, torch::Tensor scales, int64_t lo, int64_t hi, torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.dim() == 2 && q.device().is_cpu() &&
              scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == q.size(0),
              "int8 codes and float32 row scales expected");
  const int64_t K = q.size(1);
  TORCH_CHECK(0 <= lo && lo < hi && hi <= q.size(0) && K % 8 == 0, "rows or shape not handled");
  check_dequant_out(out, hi - lo, K);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(lo, hi, 16, [&](int64_t begin, int64_t end) { dequant_int8_rows(qp, sp, K, begin, end, lo, op); });
  return out;
}

torch::Tensor dequantize_int4_b64_bf16(torch::Tensor q, torch::Tensor sz, int64_t group, int64_t lo, int64_t hi,
                                       torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == torch::kByte && q.is_contiguous() && q.dim() == 2 && q.device().is_cpu(),
              "int4 codes in PyTorch's CPU layout expected");
  const int64_t N = q.size(0), K = q.size(1) * 2;
  TORCH_CHECK(group % 32 == 0 && K % group == 0 && N % 64 == 0, "shape not handled");
  check_blocked_pairs(sz, N, K, group);
  TORCH_CHECK(0 <= lo && lo < hi && hi <= N && lo % 64 == 0 && hi % 64 == 0, "rows must be whole 64-row blocks");
  check_dequant_out(out, hi - lo, K);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int32_t* szp = reinterpret_cast<const int32_t*>(sz.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(lo / 64, hi / 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) dequant_int4_b64_block(qp + b * K * 32, szp, K, group, b, lo, op);
  });
  return out;
}

// One decoding step's attention for B sequences: q (B, H, D) float32; k, v (B, Hkv, S, D) float32 or
// bfloat16, each (S, D) slab contiguous (a view of phi3v's KV cache); lengths (B) int64, the keys each
// sequence attends to (its first lengths[b]). Query head h reads key/value head h / (H / Hkv).
// Returns (B, H, D) float32.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                               double scale, int64_t prefetch) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: (B, H, D) float32");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides() &&
              k.scalar_type() == v.scalar_type(), "k and v: (B, Hkv, S, D) views of one layout");
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16,
              "a float32 or bfloat16 cache expected");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % Hkv == 0 && D % 8 == 0 && D <= kMaxHeadDim,
              "shapes not handled");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D, "each head's keys must be contiguous (S, D) rows");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.numel() == B && lengths.is_contiguous(),
              "lengths: (B) int64");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && lengths.device().is_cpu(),
              "CPU tensors expected");
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) TORCH_CHECK(lens[b] >= 1 && lens[b] <= S, "a length is outside 1..S");
  auto out = torch::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = k.stride(0), sh = k.stride(1), group = H / Hkv;
  const bool wide = D % 16 == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl");
  auto run = [&](auto* kp, auto* vp) {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(S);
      for (int64_t i = begin; i < end; i++) {
        const int64_t b = i / H, h = i % H, off = b * sb + (h / group) * sh;
        const float sc = static_cast<float>(scale);
        float* o = op + i * D;
        if (wide)
          with_prefetch(prefetch, [&](auto on) {
            attend_head_avx512<decltype(on)::value>(qp + i * D, kp + off, vp + off, lens[b], D, sc, prefetch,
                                                    scores.data(), o);
          });
        else  // the AVX2 variant does not prefetch: never measured on a CPU that would take it
          attend_head(qp + i * D, kp + off, vp + off, lens[b], D, sc, scores.data(), o);
      }
    });
  };
  if (k.scalar_type() == torch::kFloat32)
    run(k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  return out;
}

torch::Tensor quantize_row_for_test(torch::Tensor x) {
  check(x, x);
  TORCH_CHECK(x.size(1) % 32 == 0, "a multiple of 32 inputs expected");
  const Q8Row r = quantize_row(x.data_ptr<float>(), x.size(1));
  auto q = torch::from_blob(const_cast<int8_t*>(r.q.data()), {x.size(1)}, torch::kInt8).clone();
  auto d = torch::from_blob(const_cast<float*>(r.d.data()), {x.size(1) / 32}, torch::kFloat32).clone();
  return q.view({-1, 32}).to(torch::kFloat32) * d.view({-1, 1});
}

// cpu_fused.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor quick_gelu_(torch::Tensor x);
std::vector<torch::Tensor> rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t q_heads,
                                int64_t kv_heads, int64_t D);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "one float32 row times a bfloat16 weight");
  m.def("bf16_gemv_avx512", &bf16_gemv_avx512, "one bfloat16 row times a bfloat16 weight (AVX512-BF16 dot products)",
        py::arg("x"), py::arg("w"), py::arg("prefetch") = 0);
  m.def("int8_gemv", &int8_gemv, "one float32 row, quantized to int8, times an int8 weight (per-row scales)");
  m.def("int8_gemv_vnni", &int8_gemv_vnni, "int8_gemv with AVX512-VNNI dot products", py::arg("x"), py::arg("q"),
        py::arg("scales"), py::arg("prefetch") = 0);
  m.def("int4_gemv", &int4_gemv, "one float32 row, quantized to int8, times an int4 weight (PyTorch's AVX2 layout)");
  m.def("int4_gemv_b64", &int4_gemv_b64,
        "one float32 row, quantized to int8, times an int4 weight (PyTorch's AVX512 layout; needs AVX512-VNNI)",
        py::arg("x"), py::arg("q"), py::arg("sz"), py::arg("group"), py::arg("prefetch") = 0);
  m.def("dequantize_int8_bf16", &dequantize_int8_bf16, "rows lo..hi of an int8 weight as bfloat16, into out");
  m.def("dequantize_int4_b64_bf16", &dequantize_int4_b64_bf16,
        "rows lo..hi of an int4 weight (PyTorch's AVX512 layout) as bfloat16, into out");
  m.def("decode_attention", &decode_attention, "one decoding step's attention over a float32 or bfloat16 KV cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lengths"), py::arg("scale"), py::arg("prefetch") = 0);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (needs AVX512)");
  m.def("silu_mul", &silu_mul, "up * silu(gate) for the MLP's [gate; up] (needs AVX512)");
  m.def("quick_gelu_", &quick_gelu_, "x * sigmoid(1.702 x), in place (needs AVX512)");
  m.def("rope", &rope, "rotated (B, H, T, D) queries and keys from the front of (B, T, W) rows (needs AVX512)",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("D"));
  m.def("quantize_row", &quantize_row_for_test, "the int8 kernels' view of one row, dequantized: (K / 32, 32)");
}
