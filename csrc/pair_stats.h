// Host-side argument checks and sizes of pair_stats, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

namespace mmim_ext {

struct PairStatsSizes {
  int64_t B;     // batch
  int64_t m;     // units
  int64_t P;     // pairs
  int64_t K;     // critic hidden units
  int64_t R;     // permutation rows
  bool shared;   // one critic for all pairs
  bool all_pairs;
};

// Shape, dtype and device checks (cheap, no data access). The Python wrapper runs the same checks
// with friendlier wording; these guard direct calls of the op.
inline PairStatsSizes check_pair_stats_args(const at::Tensor& h, const at::Tensor& wa,
                                            const at::Tensor& wb, const at::Tensor& b,
                                            const at::Tensor& v, const at::Tensor& c,
                                            const at::Tensor& perms,
                                            const c10::optional<at::Tensor>& pairs) {
  PairStatsSizes s;
  TORCH_CHECK(h.dim() == 2, "pair_stats: 'h' must be 2-D [B, m], got ", h.sizes());
  s.B = h.size(0);
  s.m = h.size(1);
  TORCH_CHECK(s.B >= 2, "pair_stats: 'h' needs at least 2 samples, got B=", s.B);
  s.all_pairs = !pairs.has_value();
  if (s.all_pairs) {
    TORCH_CHECK(s.m >= 2, "pair_stats: 'h' needs at least 2 units when pairs is None, got m=", s.m);
    s.P = s.m * (s.m - 1) / 2;
  } else {
    const at::Tensor& pr = *pairs;
    TORCH_CHECK(pr.scalar_type() == at::kLong, "pair_stats: 'pairs' must be int64, got ", pr.scalar_type());
    TORCH_CHECK(pr.dim() == 2 && pr.size(1) == 2, "pair_stats: 'pairs' must be [P, 2], got ", pr.sizes());
    TORCH_CHECK(pr.device() == h.device(), "pair_stats: 'pairs' must be on h's device");
    s.P = pr.size(0);
  }
  TORCH_CHECK(wa.dim() == 1 || wa.dim() == 2, "pair_stats: 'wa' must be [K] or [P, K], got ", wa.sizes());
  s.shared = wa.dim() == 1;
  s.K = wa.size(-1);
  TORCH_CHECK(s.K >= 1, "pair_stats: the critic needs K >= 1 hidden units");
  if (!s.shared) {
    TORCH_CHECK(wa.size(0) == s.P, "pair_stats: 'wa' must be [P, K] with P=", s.P, ", got ", wa.sizes());
  }
  const char* names[] = {"wa", "wb", "b", "v"};
  const at::Tensor* params[] = {&wa, &wb, &b, &v};
  for (int t = 0; t < 4; ++t) {
    TORCH_CHECK(params[t]->sizes() == wa.sizes(), "pair_stats: '", names[t], "' must have the shape of 'wa' ",
                wa.sizes(), ", got ", params[t]->sizes());
    TORCH_CHECK(params[t]->scalar_type() == h.scalar_type(), "pair_stats: '", names[t],
                "' must have h's dtype ", h.scalar_type(), ", got ", params[t]->scalar_type());
    TORCH_CHECK(params[t]->device() == h.device(), "pair_stats: '", names[t], "' must be on h's device");
  }
  if (s.shared) {
    TORCH_CHECK(c.dim() == 0, "pair_stats: 'c' must be a scalar tensor for a shared critic, got ", c.sizes());
  } else {
    TORCH_CHECK(c.dim() == 1 && c.size(0) == s.P, "pair_stats: 'c' must be [P] with P=", s.P, ", got ", c.sizes());
  }
  TORCH_CHECK(c.scalar_type() == h.scalar_type(), "pair_stats: 'c' must have h's dtype");
  TORCH_CHECK(c.device() == h.device(), "pair_stats: 'c' must be on h's device");
  TORCH_CHECK(perms.scalar_type() == at::kLong, "pair_stats: 'perms' must be int64, got ", perms.scalar_type());
  TORCH_CHECK(perms.dim() == 2 && perms.size(0) >= 1 && perms.size(1) == s.B,
              "pair_stats: 'perms' must be [R, B] with R >= 1 and B=", s.B, ", got ", perms.sizes());
  TORCH_CHECK(perms.device() == h.device(), "pair_stats: 'perms' must be on h's device");
  s.R = perms.size(0);
  return s;
}

// The arguments of MINE's moving-average rule (op pair_stats_fwd_bwd_mine, every device): ema the
// per-pair state [P, 2] in h's dtype on h's device, log_a = log of the average's rate.
inline void check_mine_rule_args(const char* op, const at::Tensor& ema, double log_a, int64_t P,
                                 const at::Tensor& h) {
  TORCH_CHECK(ema.dim() == 2 && ema.size(0) == P && ema.size(1) == 2 && ema.scalar_type() == h.scalar_type() &&
                  ema.device() == h.device(),
              op, ": 'ema' must be a [P, 2] tensor in h's dtype on h's device with P=", P, ", got ", ema.sizes(), " ",
              ema.scalar_type(), " on ", ema.device());
  TORCH_CHECK(std::isfinite(log_a) && log_a <= 0.0, op, ": 'log_a' must be finite and <= 0, got ", log_a);
}

}  // namespace mmim_ext
