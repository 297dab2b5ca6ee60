// y = x @ w^T for a few rows of x (decoding: one to a few dozen tokens per step), reading each
// weight once. Written for annotated_llama/inference/matvec.py; see there for why.
//
// Shapes: x (M, K) activations, w (N, K) weights in float32, bfloat16 or float16, row-major as
// stored (no repacking, no copy). y (M, N) in x's dtype. Each thread takes a range of weight rows
// and, for every row, forms its M dot products while the row is in L1: the weights stream from
// memory once whatever M is, which is what bandwidth-bound decoding needs.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

// 16 weights at w[k..k+16) as float32 lanes. bfloat16 is the upper half of a float32, float16
// goes through F16C's conversion.
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const at::BFloat16* w) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

template <int R, int MB, typename W>
inline void tile(const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t n0, int64_t m0, int64_t k0,
                 int64_t k1, bool first) {
  // R weight rows n0.. against MB activation rows m0.., over k in [k0, k1): R*MB accumulators, each
  // weight vector loaded once for MB FMAs and each activation vector once for R
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    __m512 xs[MB];
    for (int m = 0; m < MB; ++m) xs[m] = _mm512_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      __m512 wv = load16(w + (n0 + r) * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < k1; ++j)  // the tail of a K that is not a multiple of 16
        s += static_cast<float>(w[(n0 + r) * K + j]) * x[(m0 + m) * K + j];
      float& out = y[(m0 + m) * N + n0 + r];
      out = first ? s : out + s;
    }
  }
}

#ifdef __AVX512BF16__
// bfloat16 weights against bfloat16 activations: vdpbf16ps multiplies 32 pairs and accumulates in
// float32, twice the products per instruction of an FMA and no conversion of the weights
template <int R, int MB>
inline void tile(const at::BFloat16* w, const at::BFloat16* x, float* y, int64_t K, int64_t N, int64_t n0,
                 int64_t m0, int64_t k0, int64_t k1, bool first) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    __m512bh xs[MB];
    for (int m = 0; m < MB; ++m) xs[m] = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xs[m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < k1; ++j)
        s += static_cast<float>(w[(n0 + r) * K + j]) * static_cast<float>(x[(m0 + m) * K + j]);
      float& out = y[(m0 + m) * N + n0 + r];
      out = first ? s : out + s;
    }
  }
}
#endif

template <typename W, int R, typename X>
inline void rows_of_x(const W* w, const X* x, float* y, int64_t K, int64_t N, int64_t M, int64_t n0,
                      int64_t k0, int64_t k1, bool first) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) tile<R, 4>(w, x, y, K, N, n0, m0, k0, k1, first);
  switch (M - m0) {
    case 3: tile<R, 3>(w, x, y, K, N, n0, m0, k0, k1, first); break;
    case 2: tile<R, 2>(w, x, y, K, N, n0, m0, k0, k1, first); break;
    case 1: tile<R, 1>(w, x, y, K, N, n0, m0, k0, k1, first); break;
  }
}

template <typename W, typename X>
void kernel(const W* w, const X* x, float* y, int64_t K, int64_t N, int64_t M) {
  // Each thread takes a range of weight rows, 4 at a time. K is cut into chunks small enough that
  // the M activation rows of a chunk stay in L1 while the thread's weight rows stream past them.
  const int64_t kc = std::max<int64_t>(256, std::min<int64_t>(K, (24 * 1024 / (int64_t(sizeof(X)) * M)) / 32 * 32));
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = std::min(K, k0 + kc);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * 4;
        if (n0 + 4 <= N) {
          rows_of_x<W, 4, X>(w, x, y, K, N, M, n0, k0, k1, k0 == 0);
        } else {
          for (int64_t n = n0; n < N; ++n) rows_of_x<W, 1, X>(w, x, y, K, N, M, n, k0, k1, k0 == 0);
        }
      }
    }
  });
}

at::Tensor matvec(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "matvec: x (M, K) and w (N, K) expected");
  TORCH_CHECK(w.is_contiguous(), "matvec: w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
#ifdef __AVX512BF16__
  if (w.scalar_type() == at::kBFloat16) {  // the activations rounded to bfloat16, as a bfloat16 model has them
    at::Tensor xb = x.to(at::kBFloat16).contiguous();
    kernel(w.data_ptr<at::BFloat16>(), xb.data_ptr<at::BFloat16>(), yp, K, N, M);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: kernel(w.data_ptr<float>(), xp, yp, K, N, M); break;
    case at::kBFloat16: kernel(w.data_ptr<at::BFloat16>(), xp, yp, K, N, M); break;
    case at::kHalf: kernel(w.data_ptr<at::Half>(), xp, yp, K, N, M); break;
    default: TORCH_CHECK(false, "matvec: weights must be float32, bfloat16 or float16, got ", w.scalar_type());
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(annotated_llama, m) { m.def("matvec(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(annotated_llama, CPU, m) { m.impl("matvec", &matvec); }
