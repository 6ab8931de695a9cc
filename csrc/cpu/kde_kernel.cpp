// CPU kernels of kde_lse: out[n] = log sum_l exp(-scale * ||x_n - y_l||^2), and its backward.
//
// Rows are split over threads with at::parallel_for. Each row streams over the columns in blocks
// of kBlock: squared distances for the block are accumulated coordinate by coordinate from a
// transposed copy of the other operand (unit stride along the block, so the loops vectorize at the
// baseline instruction set), then the block's (max, sum exp) is merged into the row's online
// log-sum-exp state. Memory is O((N + M) d) plus a block buffer per thread; no [N, M] matrix.
// The backward recomputes the scores and weights them by exp(s - out) (kde_math.h): one pass over
// rows for grad_x and one over columns for grad_y, so each output element is written by exactly
// one thread (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kde_math.h"

namespace mmim_ext {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256;
constexpr int kLanes = 8;  // independent partial sums, so reductions vectorize without -ffast-math

void check_kde_args(const char* op, const at::Tensor& x, const at::Tensor& y, double scale) {
  TORCH_CHECK(x.dim() == 2, op, ": 'x' must be 2-D [N, d], got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 2, op, ": 'y' must be 2-D [M, d], got shape ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": 'x' must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": 'y' must have x's dtype ", x.scalar_type(),
              ", got ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), op, ": 'x' and 'y' must be on one device");
  TORCH_CHECK(x.size(1) == y.size(1), op, ": 'x' ", x.sizes(), " and 'y' ", y.sizes(),
              " must have the same number of columns d");
  TORCH_CHECK(y.size(0) >= 1, op, ": 'y' needs at least one row");
  TORCH_CHECK(std::isfinite(scale) && scale >= 0.0, op, ": 'scale' must be finite and >= 0, got ", scale);
}

template <typename T>
void check_finite(const char* op, const char* name, const at::Tensor& t) {
  const T* p = t.data_ptr<T>();
  bool ok = true;
  for (int64_t i = 0; i < t.numel(); ++i) ok &= std::isfinite(p[i]);
  TORCH_CHECK(ok, op, ": '", name, "' contains NaN or infinite values");
}

template <typename T>
T block_max(const T* s, int64_t L) {
  T part[kLanes];
  for (int q = 0; q < kLanes; ++q) part[q] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes)
    for (int q = 0; q < kLanes; ++q) part[q] = s[j + q] > part[q] ? s[j + q] : part[q];
  T m = -INFINITY;
  for (int q = 0; q < kLanes; ++q) m = part[q] > m ? part[q] : m;
  for (; j < L; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

template <typename T>
T block_sum(const T* s, int64_t L) {
  T part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes)
    for (int q = 0; q < kLanes; ++q) part[q] += s[j + q];
  T acc = T(0);
  for (int q = 0; q < kLanes; ++q) acc += part[q];
  for (; j < L; ++j) acc += s[j];
  return acc;
}

// sum_j w[j] * (a - b[j])
template <typename T>
T weighted_diff_sum(const T* w, T a, const T* b, int64_t L) {
  T part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes)
    for (int q = 0; q < kLanes; ++q) part[q] += w[j + q] * (a - b[j + q]);
  T acc = T(0);
  for (int q = 0; q < kLanes; ++q) acc += part[q];
  for (; j < L; ++j) acc += w[j] * (a - b[j]);
  return acc;
}

// Squared distances of one point p (d coordinates, unit stride) to L points stored transposed
// (coordinate k of point j at colsT[k * ld + j]).
template <typename T>
void block_dist(const T* p, const T* colsT, int64_t ld, int64_t d, int64_t L, T* s) {
  for (int64_t j = 0; j < L; ++j) s[j] = T(0);
  for (int64_t k = 0; k < d; ++k) {
    const T a = p[k];
    const T* c = colsT + k * ld;
    for (int64_t j = 0; j < L; ++j) s[j] = kde::sq_dist_step(s[j], a, c[j]);
  }
}

int64_t grain(int64_t other_rows, int64_t d) {
  const int64_t work = std::max<int64_t>(1, other_rows * std::max<int64_t>(d, 1));
  return std::max<int64_t>(1, (int64_t{1} << 15) / work);
}

template <typename T>
void forward_rows(const T* x, const T* yT, int64_t M, int64_t d, T scale, int64_t b, int64_t e, T* out) {
  std::vector<T> buf(kBlock);
  T* s = buf.data();
  for (int64_t n = b; n < e; ++n) {
    const T* xn = x + n * d;
    kde::LseState<T> st = math::lse_empty<T>();
    for (int64_t l0 = 0; l0 < M; l0 += kBlock) {
      const int64_t L = std::min(kBlock, M - l0);
      block_dist(xn, yT + l0, M, d, L, s);
      for (int64_t j = 0; j < L; ++j) s[j] = kde::score(scale, s[j]);
      const T bmax = block_max(s, L);
      for (int64_t j = 0; j < L; ++j) s[j] = kde::block_term(s[j], bmax);
      st = kde::lse_merge(st, kde::LseState<T>{bmax, block_sum(s, L)});
    }
    out[n] = kde::lse_finish(st);
  }
}

// grad_x[n] = -2 scale g_n sum_l w_nl (x_n - y_l)
template <typename T>
void backward_x_rows(const T* x, const T* yT, const T* out, const T* g, int64_t M, int64_t d, T scale,
                     int64_t b, int64_t e, T* gx) {
  std::vector<T> buf(kBlock), acc(static_cast<size_t>(d));
  T* s = buf.data();
  for (int64_t n = b; n < e; ++n) {
    const T* xn = x + n * d;
    std::fill(acc.begin(), acc.end(), T(0));
    if (g[n] != T(0)) {
      for (int64_t l0 = 0; l0 < M; l0 += kBlock) {
        const int64_t L = std::min(kBlock, M - l0);
        block_dist(xn, yT + l0, M, d, L, s);
        for (int64_t j = 0; j < L; ++j) s[j] = kde::pair_weight(kde::score(scale, s[j]), out[n], T(1));
        for (int64_t k = 0; k < d; ++k) acc[k] += weighted_diff_sum(s, xn[k], yT + k * M + l0, L);
      }
    }
    const T f = T(-2) * scale * g[n];
    for (int64_t k = 0; k < d; ++k) gx[n * d + k] = f * acc[k];
  }
}

// grad_y[l] = 2 scale sum_n g_n w_nl (x_n - y_l) = -2 scale sum_n c_n (y_l - x_n)
template <typename T>
void backward_y_rows(const T* xT, const T* y, const T* out, const T* g, int64_t N, int64_t d, T scale,
                     int64_t b, int64_t e, T* gy) {
  std::vector<T> buf(kBlock), acc(static_cast<size_t>(d));
  T* s = buf.data();
  for (int64_t l = b; l < e; ++l) {
    const T* yl = y + l * d;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      const int64_t L = std::min(kBlock, N - n0);
      block_dist(yl, xT + n0, N, d, L, s);
      for (int64_t j = 0; j < L; ++j) s[j] = kde::pair_weight(kde::score(scale, s[j]), out[n0 + j], g[n0 + j]);
      for (int64_t k = 0; k < d; ++k) acc[k] += weighted_diff_sum(s, yl[k], xT + k * N + n0, L);
    }
    const T f = T(-2) * scale;
    for (int64_t k = 0; k < d; ++k) gy[l * d + k] = f * acc[k];
  }
}

at::Tensor kde_lse_cpu(const at::Tensor& x, const at::Tensor& y, double scale) {
  check_kde_args("kde_lse", x, y, scale);
  const int64_t N = x.size(0), M = y.size(0), d = x.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor yT = y.t().contiguous();  // [d, M]
  at::Tensor out = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kde_lse_cpu", [&] {
    check_finite<scalar_t>("kde_lse", "x", xc);
    check_finite<scalar_t>("kde_lse", "y", yT);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* yp = yT.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, N, grain(M, d), [&](int64_t b, int64_t e) {
      forward_rows<scalar_t>(xp, yp, M, d, sc, b, e, op);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kde_lse_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& y, double scale, const at::Tensor& out) {
  check_kde_args("kde_lse_bwd", x, y, scale);
  const int64_t N = x.size(0), M = y.size(0), d = x.size(1);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type() &&
                    t->device() == x.device(),
                "kde_lse_bwd: 'grad_out' and 'out' must be [N] tensors in x's dtype with N=", N,
                ", got ", t->sizes(), " ", t->scalar_type());
  }
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const at::Tensor xT = x.t().contiguous(), yT = y.t().contiguous();
  const at::Tensor gc = grad_out.contiguous(), oc = out.contiguous();
  at::Tensor gx = at::empty({N, d}, x.options());
  at::Tensor gy = at::empty({M, d}, y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kde_lse_bwd_cpu", [&] {
    using T = scalar_t;
    const T sc = static_cast<T>(scale);
    const T* gp = gc.data_ptr<T>();
    const T* opp = oc.data_ptr<T>();
    const T* xp = xc.data_ptr<T>();
    const T* yp = yc.data_ptr<T>();
    const T* xTp = xT.data_ptr<T>();
    const T* yTp = yT.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    T* gyp = gy.data_ptr<T>();
    at::parallel_for(0, N, grain(M, d), [&](int64_t b, int64_t e) {
      backward_x_rows<T>(xp, yTp, opp, gp, M, d, sc, b, e, gxp);
    });
    at::parallel_for(0, M, grain(N, d), [&](int64_t b, int64_t e) {
      backward_y_rows<T>(xTp, yp, opp, gp, N, d, sc, b, e, gyp);
    });
  });
  return {gx, gy};
}

}  // namespace
}  // namespace cpu
}  // namespace mmim_ext

TORCH_LIBRARY_IMPL(mmim_ext, CPU, m) {
  m.impl("kde_lse", &mmim_ext::cpu::kde_lse_cpu);
  m.impl("kde_lse_bwd", &mmim_ext::cpu::kde_lse_bwd_cpu);
}
