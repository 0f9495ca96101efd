// phi3v's CPU kernels for one row of activations (batch-1 decoding) times a bf16, int8 or int4 weight, for
// x86-64 CPUs with AVX2 and FMA. Built at first use by phi3v/cpu_kernels.py.
//
// Why they exist: on CPUs without AVX512 PyTorch's kernels for these (bf16 F.linear, _weight_int8pack_mm,
// _weight_int4pack_mm_for_cpu) are compute-bound; these read the same weight layouts and run 1.2-2.5x
// faster (bench/kernels.py), the bf16 one at the speed of a plain read of the weight.
// The bf16 kernel keeps the activations in float32. The int8 and int4 ones quantize them to int8 in blocks
// of 32 (one float scale per block, as llama.cpp's Q8_0) and multiply integers with vpmaddubsw: converting
// every weight to float is what bounds a float kernel here. This adds about 0.5% relative error to a
// product, against 1% (int8) and 10% (int4) from the weights' own quantization.
// All split the output rows over PyTorch's own thread pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

void check(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be one contiguous float32 row");
  TORCH_CHECK(w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(), "CPU tensors expected");
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
  auto y = torch::empty({1, N}, x.options());
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const __m256i high_half = _mm256_set1_epi32(0xFFFF0000);
  // Four weight rows at a time share each load of x; two accumulators per row hide the FMA latency.
  at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * 4; n < end * 4; n += 4) {
      const at::BFloat16* r = wp + n * K;
      __m256 a[8];
      for (auto& v : a) v = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m256 x_even = _mm256_loadu_ps(&xe[k]), x_odd = _mm256_loadu_ps(&xe[k + 8]);
        for (int i = 0; i < 4; i++) {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i * K + k));
          a[2 * i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), x_even, a[2 * i]);
          a[2 * i + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(h, high_half)), x_odd, a[2 * i + 1]);
        }
      }
      for (int i = 0; i < 4; i++) yp[n + i] = hsum(_mm256_add_ps(a[2 * i], a[2 * i + 1]));
    }
  });
  return y;
}

// y[n] = scale[n] * sum_k x[k] q[n, k] for row-major (N, K) int8 codes and a float32 scale per row, x
// quantized to int8 (Q8Row). Needs N % 4 == 0, K % 32 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  check(x, q);
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kFloat32 &&
              scales.is_contiguous() && scales.numel() == q.size(0), "int8 codes and float32 row scales expected");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && N % 4 == 0 && K % 32 == 0, "weight shape not handled");
  const Q8Row xq = quantize_row(x.data_ptr<float>(), K);
  auto y = torch::empty({1, N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256i ones = _mm256_set1_epi16(1);
  at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * 4; n < end * 4; n += 4) {
      const int8_t* r = qp + n * K;
      __m256 a[4];
      for (auto& v : a) v = _mm256_setzero_ps();
      for (int64_t b = 0; b < K / 32; b++) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&xq.q[b * 32]));
        const __m256 d = _mm256_set1_ps(xq.d[b]);
        for (int i = 0; i < 4; i++) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i * K + b * 32));
          // vpmaddubsw multiplies unsigned by signed bytes: |w| times x with w's sign (codes are in
          // -127..127, so |w| fits and no pair sum saturates).
          const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
          a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d, a[i]);
        }
      }
      for (int i = 0; i < 4; i++) yp[n + i] = hsum(a[i]) * sp[n + i];
    }
  });
  return y;
}

// y[n] = sum_k x[k] w[n, k] with w = (q - 8) * scale + zero per group of `group` inputs.
// q is PyTorch's AVX2 int4 layout, (N, K / 2) uint8 in blocks of 32 output rows: for block b and input k,
// 16 bytes whose low nibbles are rows 32b + 0..15 and high nibbles rows 32b + 16..31.
// sz is (K / group, N, 2) bfloat16 (scale, zero), as the PyTorch kernel takes it.
// Per group: sum_k x_k w_nk = scale * sum_k x_k (q_nk - 8) + zero * sum_k x_k. The first sum runs on
// int8 x (Q8Row), the second on the float32 x. Needs N % 32 == 0, group % 32 == 0.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor sz, int64_t group) {
  check(x, q);
  const int64_t K = x.size(1), N = q.size(0), G = K / group;
  TORCH_CHECK(q.size(1) * 2 == K && N % 32 == 0 && group % 32 == 0 && K % group == 0, "weight shape not handled");
  TORCH_CHECK(sz.is_contiguous() && sz.scalar_type() == torch::kBFloat16 && sz.size(0) == G && sz.size(1) == N);
  const Q8Row xq = quantize_row(x.data_ptr<float>(), K);
  std::vector<float> group_sums(G, 0.f);  // sum of the float32 x over each group, shared by all row blocks
  for (int64_t blk = 0; blk < K / 32; blk++) group_sums[blk * 32 / group] += xq.xsum[blk];
  const int16_t* xpairs = reinterpret_cast<const int16_t*>(xq.q.data());  // (x_k, x_k+1) byte pairs
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int32_t* szp = reinterpret_cast<const int32_t*>(sz.data_ptr<at::BFloat16>());  // (scale, zero) pairs
  auto y = torch::empty({1, N}, x.options());
  float* yp = y.data_ptr<float>();
  const __m256i nibbles = _mm256_set1_epi8(15), high_half = _mm256_set1_epi32(0xFFFF0000);
  // Inputs k and k + 1 of the block (32 bytes) become, per 128-bit lane, byte pairs (q[r, k], q[r, k+1])
  // for rows r = 0..7 (low lane) and 8..15 (high lane) of each nibble: vpmaddubsw's operand order.
  const __m256i interleave = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                              0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  at::parallel_for(0, N / 32, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      __m256 out[4];
      for (auto& v : out) v = _mm256_setzero_ps();
      const uint8_t* p = qp + b * K * 16;
      for (int64_t g = 0; g < G; g++) {
        __m256 a[4];  // sum_k x_k (q_k - 8) for rows 0-7, 8-15, 16-23, 24-31 of the block
        for (auto& v : a) v = _mm256_setzero_ps();
        for (int64_t blk = g * group / 32; blk < (g + 1) * group / 32; blk++) {
          __m256i s[4];
          for (auto& v : s) v = _mm256_setzero_si256();
          // int16 sums of 8 pairs at most: 8 * 2 * 15 * 127 < 32768.
          for (int half = 0; half < 2; half++) {
            __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++, p += 32) {
              _mm_prefetch(reinterpret_cast<const char*>(p) + 1536, _MM_HINT_T0);  // one stream per block
              const __m256i xv = _mm256_set1_epi16(xpairs[blk * 16 + half * 8 + j]);
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
              const __m256i c = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(v, 0xD8), interleave);
              lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(c, nibbles), xv));
              hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(c, 4), nibbles), xv));
            }
            s[0] = _mm256_add_epi32(s[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)));
            s[1] = _mm256_add_epi32(s[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)));
            s[2] = _mm256_add_epi32(s[2], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)));
            s[3] = _mm256_add_epi32(s[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1)));
          }
          const __m256 d = _mm256_set1_ps(xq.d[blk]);
          const __m256i eight_sum = _mm256_set1_epi32(8 * xq.sum[blk]);
          for (int i = 0; i < 4; i++)
            a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[i], eight_sum)), d, a[i]);
        }
        const __m256 xsum_g = _mm256_set1_ps(group_sums[g]);
        const int32_t* sz_pairs = szp + g * N + b * 32;
        for (int i = 0; i < 4; i++) {
          // A bfloat16 is the high half of a float32: the pair's low half is the scale, the high the zero.
          const __m256i sz8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz_pairs + 8 * i));
          const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(sz8, 16));
          const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(sz8, high_half));
          out[i] = _mm256_fmadd_ps(zero, xsum_g, _mm256_fmadd_ps(scale, a[i], out[i]));
        }
      }
      for (int i = 0; i < 4; i++) _mm256_storeu_ps(yp + b * 32 + 8 * i, out[i]);
    }
  });
  return y;
}

torch::Tensor quantize_row_for_test(torch::Tensor x) {
  check(x, x);
  TORCH_CHECK(x.size(1) % 32 == 0, "a multiple of 32 inputs expected");
  const Q8Row r = quantize_row(x.data_ptr<float>(), x.size(1));
  auto q = torch::from_blob(const_cast<int8_t*>(r.q.data()), {x.size(1)}, torch::kInt8).clone();
  auto d = torch::from_blob(const_cast<float*>(r.d.data()), {x.size(1) / 32}, torch::kFloat32).clone();
  return q.view({-1, 32}).to(torch::kFloat32) * d.view({-1, 1});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "one float32 row times a bfloat16 weight");
  m.def("int8_gemv", &int8_gemv, "one float32 row, quantized to int8, times an int8 weight (per-row scales)");
  m.def("int4_gemv", &int4_gemv, "one float32 row, quantized to int8, times an int4 weight (PyTorch's AVX2 layout)");
  m.def("quantize_row", &quantize_row_for_test, "the int8 kernels' view of one row, dequantized: (K / 32, 32)");
}
