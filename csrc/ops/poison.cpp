// Output poisoning for the tests (see empty_output in common.h): one flag, set through the op
// fastmae_ext::_set_poison, which fastmae.ext calls when fastmae._library.poisoned_outputs changes.
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "common.h"

namespace fastmae {
namespace {
std::atomic<bool> g_poison{false};

void set_poison(bool enabled) { g_poison.store(enabled); }
}  // namespace

bool poison_outputs() { return g_poison.load(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-1);
    }
  }
  return out;
}

}  // namespace fastmae

// No tensor arguments, so one catch-all kernel (it runs wherever it is called from).
TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  m.def("_set_poison(bool enabled) -> ()", &fastmae::set_poison);
}
