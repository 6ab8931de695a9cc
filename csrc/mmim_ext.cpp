// Op schemas of mmim_ext: every op is declared here, in the one TORCH_LIBRARY block; each device
// registers its kernels in its own TORCH_LIBRARY_IMPL (csrc/cpu/, csrc/cuda/).
//
// There is no pybind module: importing mmim_ext._C only loads this library, which runs the
// registrations (the pattern of pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

// A module with no methods: `import mmim_ext._C` loads the shared library and its static
// registrations. PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mmim_ext, m) {
  // Pairwise critic statistics (docs/design.md §2). pairs = None means all i < j in row-major order.
  m.def(
      "pair_stats_fwd(Tensor h, Tensor wa, Tensor wb, Tensor b, Tensor v, Tensor c, Tensor perms, "
      "Tensor? pairs) -> (Tensor, Tensor)");
  // Gradients w.r.t. (h, wa, wb, b, v, c) given the upstream gradients of (t_joint, lme) and the
  // forward's lme, which the backward uses to weight the shuffled samples by exp(T - lme).
  // need_h / need_params: compute the gradient w.r.t. h / those w.r.t. the critic (wa..c); one
  // not asked for is returned as an empty [0] tensor and costs nothing (autograd passes
  // needs_input_grad: a critic update on detached features, a penalty with frozen critics).
  m.def(
      "pair_stats_bwd(Tensor grad_t_joint, Tensor grad_lme, Tensor h, Tensor wa, Tensor wb, "
      "Tensor b, Tensor v, Tensor c, Tensor perms, Tensor? pairs, Tensor lme, bool need_h=True, "
      "bool need_params=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Statistics and gradients in one call, for upstream gradients known before the forward (a loss
  // that is a fixed linear combination of t_joint and lme): returns (t_joint, lme) and what
  // pair_stats_bwd would return for them. The CPU kernel does it in one pass over the samples
  // (no separate forward, no recompute of the shuffled scores); CUDA runs the two ops.
  m.def(
      "pair_stats_fwd_bwd(Tensor grad_t_joint, Tensor grad_lme, Tensor h, Tensor wa, Tensor wb, "
      "Tensor b, Tensor v, Tensor c, Tensor perms, Tensor? pairs, bool need_h=True, "
      "bool need_params=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // pair_stats_fwd_bwd for MINE's bias-corrected loss: the upstream gradient of lme[p]
  // is grad_lme[p] * exp(lme[p] - log_avg[p]), log_avg the moving average of E_Q[e^T] after folding
  // in this lme: logaddexp(ema[p, 0], log_a + lme[p]) - ema[p, 1] (math::mine_ema_ratio), known
  // only once the pass has formed lme; the caller updates its average from the returned lme.
  m.def(
      "pair_stats_fwd_bwd_mine(Tensor grad_t_joint, Tensor grad_lme, Tensor ema, float log_a, Tensor h, "
      "Tensor wa, Tensor wb, Tensor b, Tensor v, Tensor c, Tensor perms, Tensor? pairs, bool need_h=True, "
      "bool need_params=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Name of the CPU instruction set the CPU kernels dispatch to ("avx2" or "base").
  m.def("cpu_capability() -> str");
  // The CPU block cache of the ops' large outputs and buffers (csrc/cpu/output_cache.h): release
  // its free blocks; [free bytes, free blocks, limit bytes, blocks reused, blocks allocated].
  m.def("empty_cpu_cache() -> ()");
  m.def("cpu_cache_info() -> int[]");
  // Row-wise Gaussian-kernel log-sum-exp (KDE information bounds, docs/design.md §5):
  // out[n] = log sum_l exp(-scale * ||x_n - y_l||^2); the backward takes the forward's out.
  m.def("kde_lse(Tensor x, Tensor y, float scale) -> Tensor");
  m.def("kde_lse_bwd(Tensor grad_out, Tensor x, Tensor y, float scale, Tensor out) -> (Tensor, Tensor)");
}
