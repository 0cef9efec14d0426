// The CPU kernels' overrides (overrides.h): the one state, its initialisation
// from the environment, and the op fastmine::_set_cpu_overrides that tests and
// benchmarks call between kernel calls (docs/ops.md, "CPU kernel overrides").
#include "overrides.h"

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace fastmine {
namespace cpu {
namespace {

using Semihard = KernelOverrides::Semihard;
using Noise = KernelOverrides::Noise;

// The parsers, one per knob, shared by the environment and the op; `what`
// names the variable or the argument in the error.  "" is the default.
void parse_block(const std::string& s, const char* what, KernelOverrides& o) {
  if (s.empty()) {
    o.block_rows = o.buffer_kib = 0;
    return;
  }
  long long bm = 0, kib = 0;
  int end = 0;
  TORCH_CHECK_VALUE(std::sscanf(s.c_str(), "%lld,%lld%n", &bm, &kib, &end) == 2 &&
                        end == int(s.size()) && bm > 0 && kib > 0,
                    "fastmine: ", what, " must be \"BM,BUFFER_KIB\" (two positive integers) or "
                    "\"\", got \"", s, "\"");
  o.block_rows = bm;
  o.buffer_kib = kib;
}

void parse_semihard(const std::string& s, const char* what, KernelOverrides& o) {
  TORCH_CHECK_VALUE(s.empty() || s == "one" || s == "two", "fastmine: ", what,
                    " must be \"one\", \"two\" or \"\", got \"", s, "\"");
  o.semihard = s == "one" ? Semihard::OneSweep : s == "two" ? Semihard::TwoSweeps : Semihard::Auto;
}

void parse_noise(const std::string& s, const char* what, KernelOverrides& o) {
  TORCH_CHECK_VALUE(s.empty() || s == "avx2" || s == "scalar", "fastmine: ", what,
                    " must be \"avx2\", \"scalar\" or \"\", got \"", s, "\"");
  o.noise = s == "avx2" ? Noise::Avx2 : s == "scalar" ? Noise::Scalar : Noise::Auto;
}

// The inverse of the parsers (what _set_cpu_overrides returns).
std::vector<std::string> spell(const KernelOverrides& o) {
  return {o.block_rows ? std::to_string(o.block_rows) + "," + std::to_string(o.buffer_kib) : "",
          o.semihard == Semihard::OneSweep ? "one" : o.semihard == Semihard::TwoSweeps ? "two" : "",
          o.noise == Noise::Avx2 ? "avx2" : o.noise == Noise::Scalar ? "scalar" : ""};
}

KernelOverrides from_environment() {
  KernelOverrides o;
  auto env = [](const char* name) {
    const char* e = std::getenv(name);
    return std::string(e ? e : "");
  };
  parse_block(env("FASTMINE_CPU_BLOCK"), "FASTMINE_CPU_BLOCK", o);
  parse_semihard(env("FASTMINE_CPU_SEMIHARD"), "FASTMINE_CPU_SEMIHARD", o);
  parse_noise(env("FASTMINE_CPU_NOISE"), "FASTMINE_CPU_NOISE", o);
  return o;
}

std::mutex& state_mutex() {
  static std::mutex m;
  return m;
}

// The state; the caller holds state_mutex().  Initialised at the first call
// (a function-local static: once, thread-safe; an invalid environment throws
// and the next call tries again).
KernelOverrides& state() {
  static KernelOverrides s = from_environment();
  return s;
}

// fastmine::_set_cpu_overrides(block?, semihard?, noise?) -> str[3]: sets the
// given overrides (the strings of the environment variables; "" = default;
// None = unchanged) and returns the three in force before the call, [block,
// semihard, noise], so that passing them back restores them.  All arguments
// are checked before any is set.
std::vector<std::string> set_cpu_overrides(const c10::optional<std::string>& block,
                                           const c10::optional<std::string>& semihard,
                                           const c10::optional<std::string>& noise) {
  std::lock_guard<std::mutex> lock(state_mutex());
  KernelOverrides& s = state();
  KernelOverrides o = s;
  if (block) parse_block(*block, "block", o);
  if (semihard) parse_semihard(*semihard, "semihard", o);
  if (noise) parse_noise(*noise, "noise", o);
  std::vector<std::string> before = spell(s);
  s = o;
  return before;
}

}  // namespace

KernelOverrides kernel_overrides() {
  std::lock_guard<std::mutex> lock(state_mutex());
  return state();
}

}  // namespace cpu
}  // namespace fastmine

TORCH_LIBRARY_FRAGMENT(fastmine, m) {
  m.def("_set_cpu_overrides(str? block=None, str? semihard=None, str? noise=None) -> str[]",
        &fastmine::cpu::set_cpu_overrides);
}
