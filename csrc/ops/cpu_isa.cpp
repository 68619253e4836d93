// The cap on the CPU kernels' loop builds (see cpu_isa_level in common.h): one flag, set through
// the private op fastmae_ext::_cpu_isa_cap, for the tests that run every build of every CPU
// kernel against its oracle (the cpu_isa fixture of tests/conftest.py).
#include <torch/library.h>

#include <atomic>

#include "common.h"

namespace fastmae {
namespace {
std::atomic<int> g_cap{2};

// Caps the builds at `cap` (0 baseline, 1 AVX2 + FMA, 2 AVX-512: 2 lifts the cap); returns the
// best level this CPU has, uncapped, so that the caller knows which builds exist.
int64_t set_cap(int64_t cap) {
  TORCH_CHECK(0 <= cap && cap <= 2, "fastmae_ext::_cpu_isa_cap: cap must be 0, 1 or 2, got ", cap);
  g_cap.store(static_cast<int>(cap), std::memory_order_relaxed);
  return cpu_isa_detected();
}
}  // namespace

int cpu_isa_cap() { return g_cap.load(std::memory_order_relaxed); }

}  // namespace fastmae

// No tensor arguments, so one catch-all kernel (it runs wherever it is called from).
TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) { m.def("_cpu_isa_cap(int cap) -> int", &fastmae::set_cap); }
