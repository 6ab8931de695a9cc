// In-process A/B timing of two versions of the CPU loops of pair_stats
// (csrc/cpu/pair_stats_cpu_impl.h), for kernel work on a noisy machine.
//
// Separate builds timed in separate processes drift apart by more than most kernel changes gain
// (the same forward code varied by 30% between processes on the development machine). Here
// both versions are linked into one binary, each in its own namespace (the header is written to
// be compiled once per instruction set, so the namespace is its own), and their calls
// alternate on the same data: A B, then B A, and so on. The paired ratio B/A per trial cancels
// most of the drift; an A/A run (the same header twice) shows what is left.
//
// Built and run by benchmarks/kernel_ab/run.sh, which compiles kernel_ab_impl.cpp once per
// header (namespaces impl_a and impl_b, in parallel) and links both with this file. Both
// versions use the working tree's pair_stats_cpu.h and pair_stats_math.h, so only changes confined to the loops' headers (pair_stats_cpu_*.h) can be compared. AVX2 + FMA build only (the one the
// kernel dispatches to on x86-64 CPUs that have them). One thread, or with --threads T that many,
// each on a contiguous 1/T of the pairs with its own scratch and gradient buffers (as the
// driver's parts), so that effects of the threads sharing L3 and memory show.
#include "cpu/pair_stats_cpu.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

// The entry points of the two versions, each compiled in its own object (kernel_ab_impl.cpp).
namespace mmim_ext {
namespace cpu {
MMIM_DECLARE_PAIR_STATS_CPU(impl_a)
MMIM_DECLARE_PAIR_STATS_CPU(impl_b)
}  // namespace cpu
}  // namespace mmim_ext

namespace {

using namespace mmim_ext::cpu;

struct Options {
  int64_t m = 1024, B = 256, K = 16, R = 1, pairs = 16000, trials = 40, threads = 1;
  bool shared = false, need_h = true, need_params = true;
  std::string json;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr,
               "kernel_ab: %s\n"
               "options: --m M (units, >= 2) --B B (batch, >= 1) --K K (critic width, >= 1) --R R (shuffles, >= 1)\n"
               "         --pairs N (the first N pairs in row-major order, 1..m(m-1)/2) --trials T (>= 1)\n"
               "         --shared 0|1 --need-h 0|1 --need-params 0|1 (not both 0) --threads T (1..64) --json PATH\n",
               msg.c_str());
  std::exit(2);
}

int64_t parse_int(const std::string& name, const char* text, int64_t lo, int64_t hi) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi)
    usage_error(name + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                "], got '" + text + "'");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int a = 1; a < argc; a += 2) {
    const std::string k = argv[a];
    if (a + 1 >= argc) usage_error("option " + k + " needs a value");
    const char* val = argv[a + 1];
    if (k == "--m") o.m = parse_int(k, val, 2, 1 << 16);
    else if (k == "--B") o.B = parse_int(k, val, 1, 1 << 16);
    else if (k == "--K") o.K = parse_int(k, val, 1, 4096);
    else if (k == "--R") o.R = parse_int(k, val, 1, 64);
    else if (k == "--pairs") o.pairs = parse_int(k, val, 1, int64_t(1) << 40);
    else if (k == "--trials") o.trials = parse_int(k, val, 1, 100000);
    else if (k == "--threads") o.threads = parse_int(k, val, 1, 64);
    else if (k == "--shared") o.shared = parse_int(k, val, 0, 1) != 0;
    else if (k == "--need-h") o.need_h = parse_int(k, val, 0, 1) != 0;
    else if (k == "--need-params") o.need_params = parse_int(k, val, 0, 1) != 0;
    else if (k == "--json") o.json = val;
    else usage_error("unknown option " + k);
  }
  const int64_t P = o.m * (o.m - 1) / 2;
  if (o.pairs > P) usage_error("--pairs must be at most m(m-1)/2 = " + std::to_string(P));
  if (!o.need_h && !o.need_params) usage_error("--need-h and --need-params cannot both be 0");
  if (o.threads > o.pairs) usage_error("--threads must be at most --pairs");
  return o;
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

// 64-byte aligned storage, as torch allocates the tensors the driver passes to the loops (32-byte
// loads that straddle cache lines would make the harness slower than the kernel).
template <typename T>
struct Aligned64 {
  typedef T value_type;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <typename T>
using AVec = std::vector<T, Aligned64<T>>;

double max_abs_diff(const AVec<float>& x, const AVec<float>& y) {
  double d = 0;
  for (size_t i = 0; i < x.size(); ++i) d = std::max(d, static_cast<double>(std::fabs(x[i] - y[i])));
  return d;
}

// One version's outputs and buffers.
struct Side {
  AVec<float> tj, lme, gbuf, gpair, gshared, wm;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::fprintf(stderr, "kernel_ab: this CPU lacks AVX2 or FMA; the harness times the AVX2 build only\n");
    return 2;
  }
  FILE* json = nullptr;  // opened first: a bad path fails before the timing, not after
  if (!o.json.empty() && (json = std::fopen(o.json.c_str(), "w")) == nullptr) {
    std::fprintf(stderr, "kernel_ab: cannot write --json %s: %s\n", o.json.c_str(), std::strerror(errno));
    return 2;
  }
  const int64_t m = o.m, B = o.B, K = o.K, R = o.R, N = o.pairs;
  const int64_t Bp = (B + kLanes<float> - 1) / kLanes<float> * kLanes<float>;
  const int64_t P = m * (m - 1) / 2;
  const int64_t np = o.shared ? 1 : N;  // critic rows

  // Inputs as the driver stages them (pair_stats_kernel.cpp): h transposed and zero padded, the
  // shuffled second arguments gathered once.
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  AVec<float> hT(m * Bp, 0.0f), hP(R * m * Bp, 0.0f);
  for (int64_t u = 0; u < m; ++u)
    for (int64_t n = 0; n < B; ++n) hT[u * Bp + n] = nd(rng);
  AVec<int64_t> perms(R * B);
  for (int64_t r = 0; r < R; ++r) {
    int64_t* pr = perms.data() + r * B;
    for (int64_t n = 0; n < B; ++n) pr[n] = n;
    std::shuffle(pr, pr + B, rng);
    for (int64_t u = 0; u < m; ++u)
      for (int64_t n = 0; n < B; ++n) hP[(r * m + u) * Bp + n] = hT[u * Bp + pr[n]];
  }
  AVec<float> wa(np * K), wb(np * K), bias(np * K), v(np * K), c(np);
  for (auto& x : wa) x = nd(rng);
  for (auto& x : wb) x = nd(rng);
  for (auto& x : bias) x = 0.5f * nd(rng);
  for (auto& x : v) x = nd(rng) / std::sqrt(static_cast<float>(K));
  for (auto& x : c) x = 0.1f * nd(rng);
  AVec<float> gt(N), gl(N);
  for (auto& x : gt) x = nd(rng);
  for (auto& x : gl) x = nd(rng);

  PairStatsCpuArgs<float> g{hT.data(), hP.data(), nullptr, wa.data(), wb.data(),
                            bias.data(), v.data(), c.data(), B, Bp, m, P, K, R,
                            o.shared ? 0 : K, o.shared ? 0 : 1};
  g.hmax = 0.0f;  // the largest |h|, as the driver sets it
  for (const float x : hT) g.hmax = std::max(g.hmax, std::fabs(x));

  // Per thread: the forward's chunk scratch, the backward's sample weights and gradient buffers
  // (hT and hP rows; a shared critic's [4][K]).
  const int64_t T = o.threads;
  const int64_t gbuf_per = o.need_h ? (1 + R) * m * Bp : 0, wm_per = (R + 3) * Bp;
  AVec<float> fsc(T * (1 + R) * kChunkSamples);
  Side side[2];
  for (Side& s : side) {
    s.tj.assign(N, 0.0f);
    s.lme.assign(N, 0.0f);
    s.gbuf.assign(T * gbuf_per, 0.0f);
    s.gpair.assign(o.need_params && !o.shared ? 4 * N * K : 0, 0.0f);
    s.gshared.assign(T * 4 * K, 0.0f);
    s.wm.assign(T * wm_per, 0.0f);
  }
  auto scratch = [&](Side& s, int64_t th) {
    BwdScratch<float> sc;
    sc.wm = s.wm.data() + th * wm_per;
    sc.wj = sc.wm + R * Bp;
    sc.dsum = sc.wj + Bp;
    sc.gdiag = sc.dsum + Bp;
    sc.gh = o.need_h ? s.gbuf.data() + th * gbuf_per : nullptr;
    sc.gP = o.need_h ? sc.gh + m * Bp : nullptr;
    sc.gshared = s.gshared.data() + th * 4 * K;
    sc.need_h = o.need_h;
    sc.need_params = o.need_params;
    return sc;
  };
  std::vector<BwdScratch<float>> sc[2];
  for (int out = 0; out < 2; ++out)
    for (int64_t th = 0; th < T; ++th) sc[out].push_back(scratch(side[out], th));
  // f(th, begin, end) on T threads (this one and T - 1 started per call), thread th on pairs
  // [N th / T, N (th + 1) / T).
  auto par = [&](auto&& f) {
    std::vector<std::thread> pool;
    for (int64_t th = 1; th < T; ++th) pool.emplace_back([&, th] { f(th, N * th / T, N * (th + 1) / T); });
    f(int64_t{0}, int64_t{0}, N / T);
    for (std::thread& x : pool) x.join();
  };
  // out: which side's buffers receive the outputs. The agreement check below gives each version
  // its own; the timing gives both side 0's, so that neither gains from where its memory happens
  // to lie (with separate buffers, two of seven A/A runs showed one side 17-18% slower).
  auto fwd = [&](int which, int out) {
    Side& s = side[out];
    par([&](int64_t th, int64_t b, int64_t e) {
      float* f = fsc.data() + th * (1 + R) * kChunkSamples;
      if (which == 0) impl_a::forward_range<float>(g, b, e, f, s.tj.data(), s.lme.data());
      else impl_b::forward_range<float>(g, b, e, f, s.tj.data(), s.lme.data());
    });
  };
  // Both read side 0's lme (version A's in the agreement check), so that their backwards see the
  // same inputs.
  // A side's per-pair critic gradient rows (wa, wb, bias, v), or nulls when they are not wanted.
  struct GradRows {
    float *g0, *g1, *g2, *g3;
  };
  auto grad_rows = [&](Side& s) {
    float* gp = s.gpair.empty() ? nullptr : s.gpair.data();
    return GradRows{gp, gp ? gp + N * K : nullptr, gp ? gp + 2 * N * K : nullptr, gp ? gp + 3 * N * K : nullptr};
  };
  auto bwd = [&](int which, int out) {
    const auto [g0, g1, g2, g3] = grad_rows(side[out]);
    par([&](int64_t th, int64_t b, int64_t e) {
      const BwdScratch<float>& s = sc[out][th];
      if (which == 0)
        impl_a::backward_range<float>(g, b, e, gt.data(), gl.data(), side[0].lme.data(), s, g0, g1, g2, g3);
      else
        impl_b::backward_range<float>(g, b, e, gt.data(), gl.data(), side[0].lme.data(), s, g0, g1, g2, g3);
    });
  };

  // The one pass (forward_backward_range; both versions must have it): statistics and
  // gradients from the upstream gradients alone.
  auto fwd_bwd = [&](int which, int out) {
    Side& s = side[out];
    const auto [g0, g1, g2, g3] = grad_rows(s);
    par([&](int64_t th, int64_t b, int64_t e) {
      const BwdScratch<float>& x = sc[out][th];
      if (which == 0)
        impl_a::forward_backward_range<float>(g, b, e, gt.data(), gl.data(), x, g0, g1, g2, g3, s.tj.data(),
                                              s.lme.data());
      else
        impl_b::forward_backward_range<float>(g, b, e, gt.data(), gl.data(), x, g0, g1, g2, g3, s.tj.data(),
                                              s.lme.data());
    });
  };
  auto zero_grads = [&]() {
    for (Side& s : side) {
      std::fill(s.gbuf.begin(), s.gbuf.end(), 0.0f);
      std::fill(s.gpair.begin(), s.gpair.end(), 0.0f);
      std::fill(s.gshared.begin(), s.gshared.end(), 0.0f);
    }
  };

  // Agreement (once, from zeroed buffers): the largest absolute difference of each output. A
  // change that keeps the arithmetic gives 0; one that reorders sums gives rounding-level values.
  fwd(0, 0);
  fwd(1, 1);
  bwd(0, 0);
  bwd(1, 1);
  const double d_fwd = std::max(max_abs_diff(side[0].tj, side[1].tj), max_abs_diff(side[0].lme, side[1].lme));
  const double d_h = max_abs_diff(side[0].gbuf, side[1].gbuf);
  const double d_p = std::max(max_abs_diff(side[0].gpair, side[1].gpair), max_abs_diff(side[0].gshared, side[1].gshared));
  zero_grads();
  fwd_bwd(0, 0);
  fwd_bwd(1, 1);
  const double d1_fwd = std::max(max_abs_diff(side[0].tj, side[1].tj), max_abs_diff(side[0].lme, side[1].lme));
  const double d1_h = max_abs_diff(side[0].gbuf, side[1].gbuf);
  const double d1_p = std::max(max_abs_diff(side[0].gpair, side[1].gpair), max_abs_diff(side[0].gshared, side[1].gshared));
  std::printf(
      "kernel_ab: m=%lld B=%lld K=%lld R=%lld pairs=%lld (of %lld) %s need_h=%d need_params=%d trials=%lld threads=%lld\n",
      (long long)m, (long long)B, (long long)K, (long long)R, (long long)N, (long long)P, o.shared ? "shared" : "per-pair",
      o.need_h, o.need_params, (long long)o.trials, (long long)T);
  std::printf("max |A - B|: forward %.3g, h-gradient buffers %.3g, critic gradients %.3g\n", d_fwd, d_h, d_p);
  std::printf("max |A - B| one pass: statistics %.3g, h-gradient buffers %.3g, critic gradients %.3g\n", d1_fwd,
              d1_h, d1_p);

  // Timing: ns per pair; each trial runs A and B back to back, alternating which goes first.
  constexpr int kDirs = 3;
  const char* names[kDirs] = {"forward", "backward", "fwd_bwd"};
  std::vector<double> t[kDirs][2];
  for (int64_t tr = 0; tr < o.trials; ++tr) {
    for (int dir = 0; dir < kDirs; ++dir) {
      for (int q = 0; q < 2; ++q) {
        const int which = (tr % 2 == 0) ? q : 1 - q;
        const auto t0 = std::chrono::steady_clock::now();
        if (dir == 0) fwd(which, 0);
        else if (dir == 1) bwd(which, 0);
        else fwd_bwd(which, 0);
        const auto t1 = std::chrono::steady_clock::now();
        t[dir][which].push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(N));
      }
    }
  }
  std::printf("%-9s %10s %10s %10s %10s   %s\n", "", "A min", "A median", "B min", "B median",
              "B/A per trial: median [25%, 75%]");
  for (int dir = 0; dir < kDirs; ++dir) {
    std::vector<double> ratio;
    for (size_t i = 0; i < t[dir][0].size(); ++i) ratio.push_back(t[dir][1][i] / t[dir][0][i]);
    std::printf("%-9s %10.1f %10.1f %10.1f %10.1f   %.3f [%.3f, %.3f]   (ns per pair)\n", names[dir],
                quantile(t[dir][0], 0.0), quantile(t[dir][0], 0.5), quantile(t[dir][1], 0.0),
                quantile(t[dir][1], 0.5), quantile(ratio, 0.5), quantile(ratio, 0.25), quantile(ratio, 0.75));
  }

  if (json != nullptr) {
    FILE* f = json;
    std::fprintf(f, "{\"m\": %lld, \"B\": %lld, \"K\": %lld, \"R\": %lld, \"pairs\": %lld, \"shared\": %s, ",
                 (long long)m, (long long)B, (long long)K, (long long)R, (long long)N, o.shared ? "true" : "false");
    std::fprintf(f, "\"need_h\": %s, \"need_params\": %s, \"threads\": %lld, ", o.need_h ? "true" : "false",
                 o.need_params ? "true" : "false", (long long)T);
    std::fprintf(f, "\"max_abs_diff\": {\"forward\": %.9g, \"h\": %.9g, \"params\": %.9g}, ", d_fwd, d_h, d_p);
    std::fprintf(f, "\"max_abs_diff_fwd_bwd\": {\"statistics\": %.9g, \"h\": %.9g, \"params\": %.9g}, ", d1_fwd,
                 d1_h, d1_p);
    std::fprintf(f, "\"ns_per_pair\": {");
    for (int dir = 0; dir < kDirs; ++dir) {
      std::fprintf(f, "%s\"%s\": {", dir ? ", " : "", names[dir]);
      for (int w = 0; w < 2; ++w) {
        std::fprintf(f, "%s\"%s\": [", w ? ", " : "", w ? "B" : "A");
        for (size_t i = 0; i < t[dir][w].size(); ++i) std::fprintf(f, "%s%.1f", i ? ", " : "", t[dir][w][i]);
        std::fprintf(f, "]");
      }
      std::fprintf(f, "}");
    }
    std::fprintf(f, "}}\n");
    std::fclose(f);
  }
  return 0;
}
