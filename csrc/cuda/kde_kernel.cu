// CUDA kernels of kde_lse: out[n] = log sum_l exp(-scale * ||x_n - y_l||^2), and its backward.
// The per-element math (squared-distance step, score, online log-sum-exp, softmax weight) is the
// shared header's (csrc/kde_math.h), the functions the CPU kernel runs.
//
// Launch configuration: a thread owns one point of the "owner" set (x rows in the forward and
// for grad_x, y rows for grad_y), 128 owners per block (blockIdx.x); blockIdx.y splits the other
// set into kSplit-column ranges so that small N still fills the GPU. The block stages the other
// set in shared-memory tiles of kTL points x kTD coordinates (coalesced loads; every thread then
// reads the same tile element: a broadcast), while each thread reads its own coordinates from a
// transposed copy [d][N] (neighbouring threads, neighbouring points: coalesced). A thread keeps
// kTL squared distances in registers.
//   forward   per thread and split an online log-sum-exp state (max, sum) -> [splits][N];
//             a second kernel merges the splits of each row in a fixed order.
//   backward  pass A: distances of a tile -> weights w = g exp(s - out) (kde_math.h);
//             pass B: acc[k][own] += sum_j w_j (own_k - other_jk), in the thread's own column of a
//             [splits][d][N] buffer (one writer per element), summed over splits by ATen and
//             scaled by -2 scale. No atomics: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "kde_math.h"

namespace mmim_ext {
namespace cuda {
namespace {

constexpr int kOwners = 128;  // threads per block, one owner point each
constexpr int kTL = 32;       // other points per shared tile
constexpr int kTD = 32;       // coordinates per shared tile
constexpr int64_t kSplitCols = 256;  // columns of the other set per block (at least)
constexpr int64_t kMaxSplits = 32;

// Stage other[l0 + j][k0 + kk] (j < kTL, kk < kTD) into the tile, zero outside.
template <typename T>
__device__ __forceinline__ void load_tile(T (&tile)[kTL][kTD], const T* __restrict__ other, int64_t n_other,
                                          int64_t d, int64_t l0, int64_t k0) {
  for (int e = threadIdx.x; e < kTL * kTD; e += blockDim.x) {
    const int j = e / kTD, kk = e % kTD;
    const int64_t l = l0 + j, k = k0 + kk;
    tile[j][kk] = (l < n_other && k < d) ? other[l * d + k] : T(0);
  }
}

// Squared distances of the owner point to the kTL other points of the tile starting at l0.
template <typename T>
__device__ __forceinline__ void tile_dist(T (&tile)[kTL][kTD], const T* __restrict__ ownT, int64_t n_own,
                                          int64_t own, bool own_ok, const T* __restrict__ other, int64_t n_other,
                                          int64_t d, int64_t l0, T (&s)[kTL]) {
#pragma unroll
  for (int j = 0; j < kTL; ++j) s[j] = T(0);
  for (int64_t k0 = 0; k0 < d; k0 += kTD) {
    __syncthreads();
    load_tile(tile, other, n_other, d, l0, k0);
    __syncthreads();
    const int kn = static_cast<int>(d - k0 < kTD ? d - k0 : kTD);
    for (int kk = 0; kk < kn; ++kk) {
      const T a = own_ok ? ownT[(k0 + kk) * n_own + own] : T(0);
#pragma unroll
      for (int j = 0; j < kTL; ++j) s[j] = kde::sq_dist_step(s[j], a, tile[j][kk]);
    }
  }
}

// Column range [begin, end) of the other set handled by split blockIdx.y.
__device__ __forceinline__ void split_range(int64_t n_other, int64_t* begin, int64_t* end) {
  const int64_t per = (n_other + gridDim.y - 1) / gridDim.y;
  const int64_t rounded = (per + kTL - 1) / kTL * kTL;
  *begin = std::min<int64_t>(n_other, blockIdx.y * rounded);
  *end = std::min<int64_t>(n_other, *begin + rounded);
}

template <typename T>
__global__ void __launch_bounds__(kOwners)
    kde_fwd_kernel(const T* __restrict__ xT, const T* __restrict__ y, int64_t N, int64_t M, int64_t d, T scale,
                   T* __restrict__ part_max, T* __restrict__ part_sum) {
  __shared__ T tile[kTL][kTD];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool ok = n < N;
  int64_t begin, end;
  split_range(M, &begin, &end);
  kde::LseState<T> st = math::lse_empty<T>();
  T s[kTL];
  for (int64_t l0 = begin; l0 < end; l0 += kTL) {
    tile_dist(tile, xT, N, n, ok, y, M, d, l0, s);
    T bmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTL; ++j) {
      s[j] = l0 + j < end ? kde::score(scale, s[j]) : -INFINITY;
      bmax = s[j] > bmax ? s[j] : bmax;
    }
    T bsum = T(0);
#pragma unroll
    for (int j = 0; j < kTL; ++j) bsum += l0 + j < end ? kde::block_term(s[j], bmax) : T(0);
    st = kde::lse_merge(st, kde::LseState<T>{bmax, bsum});
  }
  if (ok) {
    part_max[blockIdx.y * N + n] = st.max;
    part_sum[blockIdx.y * N + n] = st.sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kOwners)
    kde_merge_kernel(const T* __restrict__ part_max, const T* __restrict__ part_sum, int64_t splits, int64_t N,
                     T* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  kde::LseState<T> st = math::lse_empty<T>();
  for (int64_t q = 0; q < splits; ++q) st = kde::lse_merge(st, kde::LseState<T>{part_max[q * N + n], part_sum[q * N + n]});
  out[n] = kde::lse_finish(st);
}

// acc[split][k][own] = sum over the split's other points j of w_j (own_k - other_jk), with
// w_j = g_r exp(s_j - out_r) for r = own (kOwnerRows, grad_x) or r = j (grad_y).
template <typename T, bool kOwnerRows>
__global__ void __launch_bounds__(kOwners)
    kde_bwd_kernel(const T* __restrict__ ownT, const T* __restrict__ other, int64_t n_own, int64_t n_other,
                   int64_t d, T scale, const T* __restrict__ out, const T* __restrict__ g, T* __restrict__ acc) {
  __shared__ T tile[kTL][kTD];
  const int64_t own = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool ok = own < n_own;
  int64_t begin, end;
  split_range(n_other, &begin, &end);
  T* __restrict__ dst = acc + static_cast<int64_t>(blockIdx.y) * d * n_own;
  const T out_own = (kOwnerRows && ok) ? out[own] : T(0);
  const T g_own = (kOwnerRows && ok) ? g[own] : T(0);
  T w[kTL];
  for (int64_t l0 = begin; l0 < end; l0 += kTL) {
    tile_dist(tile, ownT, n_own, own, ok, other, n_other, d, l0, w);
#pragma unroll
    for (int j = 0; j < kTL; ++j) {
      const int64_t l = l0 + j;
      const bool valid = ok && l < end;
      const T out_r = kOwnerRows ? out_own : (valid ? out[l] : T(0));
      const T g_r = kOwnerRows ? g_own : (valid ? g[l] : T(0));
      w[j] = valid ? kde::pair_weight(kde::score(scale, w[j]), out_r, g_r) : T(0);
    }
    for (int64_t k0 = 0; k0 < d; k0 += kTD) {
      __syncthreads();
      load_tile(tile, other, n_other, d, l0, k0);
      __syncthreads();
      const int kn = static_cast<int>(d - k0 < kTD ? d - k0 : kTD);
      for (int kk = 0; kk < kn; ++kk) {
        const T a = ok ? ownT[(k0 + kk) * n_own + own] : T(0);
        T r = T(0);
#pragma unroll
        for (int j = 0; j < kTL; ++j) r += w[j] * (a - tile[j][kk]);
        if (ok) dst[(k0 + kk) * n_own + own] += r;
      }
    }
  }
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& y, double scale) {
  TORCH_CHECK(x.dim() == 2, op, ": 'x' must be 2-D [N, d], got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 2, op, ": 'y' must be 2-D [M, d], got shape ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": 'x' must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": 'y' must have x's dtype ", x.scalar_type(), ", got ",
              y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), op, ": 'x' and 'y' must be on one device");
  TORCH_CHECK(x.size(1) == y.size(1), op, ": 'x' ", x.sizes(), " and 'y' ", y.sizes(),
              " must have the same number of columns d");
  TORCH_CHECK(y.size(0) >= 1, op, ": 'y' needs at least one row");
  TORCH_CHECK(std::isfinite(scale) && scale >= 0.0, op, ": 'scale' must be finite and >= 0, got ", scale);
}

int64_t splits_for(int64_t n_other) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, n_other / kSplitCols));
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>(std::max<int64_t>(1, (n + kOwners - 1) / kOwners)); }

at::Tensor kde_lse_cuda(const at::Tensor& x, const at::Tensor& y, double scale) {
  check_args("kde_lse", x, y, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), M = y.size(0), d = x.size(1);
  at::Tensor out = at::empty({N}, x.options());
  if (N == 0) return out;
  const at::Tensor xT = x.t().contiguous();  // [d, N]
  const at::Tensor yc = y.contiguous();
  const int64_t splits = splits_for(M);
  at::Tensor pmax = at::empty({splits, N}, x.options());
  at::Tensor psum = at::empty({splits, N}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kde_lse_cuda", [&] {
    const dim3 grid(blocks_for(N), static_cast<unsigned int>(splits));
    kde_fwd_kernel<scalar_t><<<grid, kOwners, 0, stream>>>(xT.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), N, M, d,
                                                           static_cast<scalar_t>(scale), pmax.data_ptr<scalar_t>(),
                                                           psum.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kde_merge_kernel<scalar_t><<<blocks_for(N), kOwners, 0, stream>>>(pmax.data_ptr<scalar_t>(), psum.data_ptr<scalar_t>(),
                                                                      splits, N, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kde_lse_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& y, double scale, const at::Tensor& out) {
  check_args("kde_lse_bwd", x, y, scale);
  const int64_t N = x.size(0), M = y.size(0), d = x.size(1);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "kde_lse_bwd: 'grad_out' and 'out' must be [N] tensors in x's dtype on x's device with N=", N,
                ", got ", t->sizes(), " ", t->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const at::Tensor xT = x.t().contiguous(), yT = y.t().contiguous();
  const at::Tensor gc = grad_out.contiguous(), oc = out.contiguous();
  const int64_t sx = splits_for(M), sy = splits_for(N);
  at::Tensor accx = at::zeros({sx, d, N}, x.options());
  at::Tensor accy = at::zeros({sy, d, M}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (N > 0 && d > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kde_lse_bwd_cuda", [&] {
      using T = scalar_t;
      const T sc = static_cast<T>(scale);
      kde_bwd_kernel<T, true><<<dim3(blocks_for(N), static_cast<unsigned int>(sx)), kOwners, 0, stream>>>(
          xT.data_ptr<T>(), yc.data_ptr<T>(), N, M, d, sc, oc.data_ptr<T>(), gc.data_ptr<T>(), accx.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kde_bwd_kernel<T, false><<<dim3(blocks_for(M), static_cast<unsigned int>(sy)), kOwners, 0, stream>>>(
          yT.data_ptr<T>(), xc.data_ptr<T>(), M, N, d, sc, oc.data_ptr<T>(), gc.data_ptr<T>(), accy.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Splits summed in a fixed order; the factor -2 scale of d(-scale ||x - y||^2) applied once.
  at::Tensor gx = accx.sum(0).t().mul(-2.0 * scale).contiguous();
  at::Tensor gy = accy.sum(0).t().mul(-2.0 * scale).contiguous();
  return {gx, gy};
}

}  // namespace
}  // namespace cuda
}  // namespace mmim_ext

TORCH_LIBRARY_IMPL(mmim_ext, CUDA, m) {
  m.impl("kde_lse", &mmim_ext::cuda::kde_lse_cuda);
  m.impl("kde_lse_bwd", &mmim_ext::cuda::kde_lse_bwd_cuda);
}
