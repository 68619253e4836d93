// The runtime of the CUDA emulation (emu.h): blocks one after another, a block's threads as
// fibers on the calling thread, barriers and warp collectives released by a small
// scheduler that checks CUDA's rules on the way.
#include "emu.h"

#include <torch/library.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

// The switch between fibers: on x86-64 a few instructions (the callee-saved registers and the
// stack pointer; swapcontext would make a system call for the signal mask at every barrier,
// which dominated the run time), elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
#define EMU_FAST_SWITCH 1
#else
#define EMU_FAST_SWITCH 0
#endif

namespace emu {

dim3 g_block_idx, g_block_dim, g_grid_dim;

namespace {

enum class State { kRun, kBlockWait, kWarpWait, kDone };
enum class Op { kSyncWarp, kShfl, kMma };

const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kShfl: return "__shfl_xor_sync";
    case Op::kMma: return "mma.sync.m16n8k16";
  }
  return "?";
}

struct Fiber {
#if EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  dim3 tid;
  State state = State::kRun;
  Op op = Op::kSyncWarp;
  unsigned mask = 0;
  int lane_mask = 0, width = 32;
  bool bf16 = false;
  uint64_t bits = 0;
  float c[4] = {};
  uint32_t a[4] = {}, b[2] = {};
};

constexpr size_t kStackBytes = 128 * 1024;
// Past the end of dynamic shared memory: 0xff bytes like the memory itself (a read past the end
// sees NaN / -1, not a plausible 0), checked unchanged after each block; poisoned under ASan, so
// that a read or write there is reported where it happens.
constexpr size_t kGuardBytes = 4096;
constexpr int kStaticSmemLimit = 48 * 1024;

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
#if EMU_FAST_SWITCH
  void* main_sp = nullptr;
#else
  ucontext_t main_ctx;
#endif
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem;
  std::string kernel;
  int order = 0;  // 0 ascending, 1 descending, 2 shuffled
  std::mt19937_64 rng{0};
  std::unordered_map<const void*, int> max_dynamic;
  std::unordered_map<const void*, size_t> static_smem;  // the running launch's static arrays
  std::unordered_set<const void*> static_this_block;     // those the running block has declared
  const int optin = 227 * 1024;  // sm_90's opt-in limit a block (SMEM_OPTIN in __init__.py)
  int64_t launches = 0;
};

Scheduler& S() {
  static Scheduler s;
  return s;
}

void yield_to_scheduler() {
  Scheduler& s = S();
  TORCH_CHECK(s.cur != nullptr, "emu: a barrier or warp collective outside a kernel");
#if EMU_FAST_SWITCH
  emu_switch(&s.cur->sp, s.main_sp);
#else
  swapcontext(&s.cur->ctx, &s.main_ctx);
#endif
}

void resume(Fiber& f) {
  Scheduler& s = S();
  s.cur = &f;
#if EMU_FAST_SWITCH
  emu_switch(&s.main_sp, f.sp);
#else
  swapcontext(&s.main_ctx, &f.ctx);
#endif
  s.cur = nullptr;
}

void fiber_entry() {
  Scheduler& s = S();
  (*s.body)();
  s.cur->state = State::kDone;
#if EMU_FAST_SWITCH
  emu_switch(&s.cur->sp, s.main_sp);  // never resumed
  std::abort();
#endif
  // ucontext: returning resumes main_ctx (uc_link)
}

[[noreturn]] void fail(const std::string& what) {
  Scheduler& s = S();
  TORCH_CHECK(false, "emu: kernel ", s.kernel, " block (", g_block_idx.x, ", ", g_block_idx.y, ", ", g_block_idx.z,
              "): ", what);
}

// 16 x 16 A (row), 16 x 8 B (col), 16 x 8 fp32 C/D of m16n8k16 from the 32 lanes' fragments
// (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4 g + t:
//   A: a[0] = (g, 2t | 2t+1), a[1] = (g+8, 2t | 2t+1), a[2] = (g, 2t+8 | 2t+9), a[3] = (g+8, 2t+8 | 2t+9)
//   B: b[0] = (2t | 2t+1, g), b[1] = (2t+8 | 2t+9, g)
//   C: c[0], c[1] = (g, 2t), (g, 2t+1); c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
// each 32-bit register holding its lower-index element in the low 16 bits.
float half_bits(uint16_t u, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
}

void do_mma(Fiber* lanes) {
  float A[16][16], B[16][8], C[16][8];
  const bool bf16 = lanes[0].bf16;
  for (int lane = 0; lane < 32; ++lane) {
    const Fiber& f = lanes[lane];
    if (f.bf16 != bf16) fail("the lanes of one mma.sync disagree on its type");
    const int g = lane >> 2, t = lane & 3;
    for (int h = 0; h < 2; ++h) {
      const int col = 2 * t + h;
      auto el = [&](uint32_t r) { return half_bits(static_cast<uint16_t>(r >> (16 * h)), bf16); };
      A[g][col] = el(f.a[0]);
      A[g + 8][col] = el(f.a[1]);
      A[g][col + 8] = el(f.a[2]);
      A[g + 8][col + 8] = el(f.a[3]);
      B[col][g] = el(f.b[0]);
      B[col + 8][g] = el(f.b[1]);
      C[g][col] = f.c[h];
      C[g + 8][col] = f.c[2 + h];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    Fiber& f = lanes[lane];
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      f.c[e] = acc;
    }
  }
}

// Releases the warp collectives whose 32 lanes have all arrived; true when any was released.
bool release_warps(int nthreads) {
  Scheduler& s = S();
  bool released = false;
  for (int w0 = 0; w0 < nthreads; w0 += 32) {
    const int n = std::min(32, nthreads - w0);
    Fiber* lanes = &s.fibers[w0];
    int waiting = 0, first = -1;
    for (int l = 0; l < n; ++l)
      if (lanes[l].state == State::kWarpWait) {
        ++waiting;
        if (first < 0) first = l;
      }
    if (waiting == 0) continue;
    const Op op = lanes[first].op;
    const std::string where = std::string(op_name(op)) + " in warp " + std::to_string(w0 / 32) + " (lane " +
                              std::to_string(first) + " of threads from " + std::to_string(w0) + ")";
    if (n < 32) fail(where + ": a collective of a warp with " + std::to_string(n) + " threads (blockDim not a multiple of 32)");
    for (int l = 0; l < 32; ++l) {
      const Fiber& f = lanes[l];
      if (f.state == State::kDone) fail(where + ": lane " + std::to_string(l) + " returned before it");
      if (f.state == State::kBlockWait) fail(where + ": lane " + std::to_string(l) + " waits at __syncthreads instead");
      if (f.state == State::kWarpWait && f.op != op)
        fail(where + ": lane " + std::to_string(l) + " waits at " + op_name(f.op) + " instead");
      if (f.mask != 0xffffffffu) fail(where + ": a mask other than 0xffffffff (not emulated)");
    }
    if (op == Op::kShfl) {
      uint64_t in[32];
      for (int l = 0; l < 32; ++l) in[l] = lanes[l].bits;
      for (int l = 0; l < 32; ++l) {
        const int width = lanes[l].width, src = l ^ (lanes[l].lane_mask & 31);
        if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail(where + ": width not a power of 2 up to 32");
        lanes[l].bits = (src / width > l / width || src >= 32) ? in[l] : in[src];
      }
    } else if (op == Op::kMma) {
      do_mma(lanes);
    }
    for (int l = 0; l < 32; ++l) lanes[l].state = State::kRun;
    released = true;
  }
  return released;
}

void run_block(int nthreads) {
  Scheduler& s = S();
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = s.fibers[i];
    f = Fiber();
    const unsigned bx = g_block_dim.x, by = g_block_dim.y;
    f.tid = dim3(i % bx, (i / bx) % by, i / (bx * by));
#if EMU_FAST_SWITCH
    // the frame emu_switch pops: control words, 6 registers, then "returns" into fiber_entry
    // with the stack as a call leaves it (rsp = 8 mod 16 after the ret: top - 24)
    auto top = reinterpret_cast<uintptr_t>(s.stacks[i].get() + kStackBytes) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<uint64_t*>(top) - 11;
    uint32_t csr[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    std::memcpy(&sp[0], csr, 8);
    for (int r = 1; r <= 6; ++r) sp[r] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&fiber_entry);
    sp[8] = 0;  // fiber_entry's (absent) return address
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.main_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
  }
  std::vector<int> idx(nthreads);
  std::iota(idx.begin(), idx.end(), 0);
  if (s.order == 1) std::reverse(idx.begin(), idx.end());
  for (;;) {
    if (s.order == 2) std::shuffle(idx.begin(), idx.end(), s.rng);
    for (int i : idx) {
      Fiber& f = s.fibers[i];
      if (f.state != State::kRun) continue;
      resume(f);
    }
    if (release_warps(nthreads)) continue;
    int done = 0, block_wait = 0;
    for (int i = 0; i < nthreads; ++i) {
      done += s.fibers[i].state == State::kDone;
      block_wait += s.fibers[i].state == State::kBlockWait;
    }
    if (done == nthreads) return;
    if (done + block_wait == nthreads) {
      for (int i = 0; i < nthreads; ++i)
        if (s.fibers[i].state == State::kBlockWait) s.fibers[i].state = State::kRun;
      continue;
    }
    fail("deadlock: no barrier can be released");
  }
}

}  // namespace

const dim3& thread_idx() {
  Scheduler& s = S();
  TORCH_CHECK(s.cur != nullptr, "emu: threadIdx outside a kernel");
  return s.cur->tid;
}

void* dynamic_smem() { return S().smem.data(); }

void set_max_dynamic_smem(const void* kernel, int bytes) {
  Scheduler& s = S();
  TORCH_CHECK(bytes >= 0 && bytes <= s.optin, "emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", bytes,
              ") is above the card's opt-in limit of ", s.optin, " bytes (cudaErrorInvalidValue)");
  s.max_dynamic[kernel] = bytes;
}

int smem_optin() { return S().optin; }

// The first thread of a block to reach the declaration fills the array with 0xff (NaN, -1), as
// dynamic shared memory is: a static array keeps no values from an earlier block or launch.
void note_static_smem(const void* array, size_t bytes) {
  Scheduler& s = S();
  s.static_smem[array] = bytes;
  if (s.static_this_block.insert(array).second) std::memset(const_cast<void*>(array), 0xff, bytes);
}

void launch_body(const void* kernel, const char* name, const Config& cfg, const std::function<void()>& body) {
  Scheduler& s = S();
  TORCH_CHECK(s.cur == nullptr, "emu: a launch from inside a kernel");
  s.kernel = name;
  const dim3 g = cfg.grid, b = cfg.block;
  const int64_t nthreads = static_cast<int64_t>(b.x) * b.y * b.z;
  TORCH_CHECK(g.x >= 1 && g.y >= 1 && g.z >= 1, "emu: launch of ", name, " with an empty grid (", g.x, ", ", g.y, ", ",
              g.z, "): cudaErrorInvalidConfiguration");
  TORCH_CHECK(g.x <= 2147483647u && g.y <= 65535u && g.z <= 65535u, "emu: launch of ", name, ": grid (", g.x, ", ", g.y,
              ", ", g.z, ") above CUDA's limits (2^31 - 1, 65535, 65535): cudaErrorInvalidConfiguration");
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024 && b.x <= 1024 && b.y <= 1024 && b.z <= 64, "emu: launch of ", name,
              ": block (", b.x, ", ", b.y, ", ", b.z, ") above CUDA's limits: cudaErrorInvalidConfiguration");
  auto it = s.max_dynamic.find(kernel);
  const int64_t limit = it == s.max_dynamic.end() ? kStaticSmemLimit : it->second;
  TORCH_CHECK(static_cast<int64_t>(cfg.smem) <= limit, "emu: launch of ", name, " with ", cfg.smem,
              " bytes of dynamic shared memory; the kernel's limit is ", limit,
              it == s.max_dynamic.end() ? " (above 48 KB needs cudaFuncSetAttribute)" : "",
              ": cudaErrorInvalidValue");
  if (static_cast<int64_t>(s.fibers.size()) < nthreads) s.fibers.resize(nthreads);
  while (static_cast<int64_t>(s.stacks.size()) < nthreads) s.stacks.emplace_back(new char[kStackBytes]);
  s.smem.assign(cfg.smem + kGuardBytes + 16, 0);
  s.body = &body;
  ++s.launches;
  g_block_dim = b;
  g_grid_dim = g;
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back(dim3(x, y, z));
  if (s.order == 1) std::reverse(blocks.begin(), blocks.end());
  if (s.order == 2) std::shuffle(blocks.begin(), blocks.end(), s.rng);
  s.static_smem.clear();
  for (const dim3& bi : blocks) {
    g_block_idx = bi;
    std::memset(s.smem.data(), 0xff, cfg.smem + kGuardBytes);
    s.static_this_block.clear();
    EMU_POISON(s.smem.data() + cfg.smem, kGuardBytes);
    run_block(static_cast<int>(nthreads));
    EMU_UNPOISON(s.smem.data() + cfg.smem, kGuardBytes);
    // static + dynamic: at most 48 KB without the opt-in, the card's limit with it
    size_t stat = 0;
    for (const auto& a : s.static_smem) stat += a.second;
    const bool opted = it != s.max_dynamic.end();
    const size_t total_limit = opted ? static_cast<size_t>(s.optin) : static_cast<size_t>(kStaticSmemLimit);
    if (stat + cfg.smem > total_limit)
      fail(std::to_string(stat) + " bytes of static and " + std::to_string(cfg.smem) +
           " of dynamic shared memory are above the " + std::to_string(total_limit) + " a block may have" +
           (opted ? "" : " without the opt-in") + " (cudaErrorInvalidValue at launch)");
    for (size_t i = 0; i < kGuardBytes; ++i)
      if (s.smem[cfg.smem + i] != 0xff)
        fail("a write " + std::to_string(i) + " bytes past the end of its " + std::to_string(cfg.smem) +
             " bytes of dynamic shared memory");
  }
  s.body = nullptr;
}

void syncthreads() {
  S().cur->state = State::kBlockWait;
  yield_to_scheduler();
}

namespace {
Fiber* enter_warp_op(Op op, unsigned mask) {
  Scheduler& s = S();
  TORCH_CHECK(s.cur != nullptr, "emu: ", op_name(op), " outside a kernel");
  Fiber* f = s.cur;
  f->state = State::kWarpWait;
  f->op = op;
  f->mask = mask;
  return f;
}
}  // namespace

void syncwarp(unsigned mask) {
  enter_warp_op(Op::kSyncWarp, mask);
  yield_to_scheduler();
}

uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask, int width) {
  Fiber* f = enter_warp_op(Op::kShfl, mask);
  f->bits = bits;
  f->lane_mask = lane_mask;
  f->width = width;
  yield_to_scheduler();
  return f->bits;
}

void mma_m16n8k16(bool bf16, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Fiber* f = enter_warp_op(Op::kMma, 0xffffffffu);
  f->bf16 = bf16;
  for (int i = 0; i < 4; ++i) f->c[i] = c[i], f->a[i] = a[i];
  f->b[0] = b0;
  f->b[1] = b1;
  yield_to_scheduler();
  for (int i = 0; i < 4; ++i) c[i] = f->c[i];
}

namespace {
// order: 0 ascending, 1 descending, 2 shuffled from seed.
void set_order(int64_t order, int64_t seed) {
  TORCH_CHECK(0 <= order && order <= 2, "emu_set_order: order must be 0, 1 or 2");
  Scheduler& s = S();
  s.order = static_cast<int>(order);
  s.rng.seed(static_cast<uint64_t>(seed));
}
int64_t launches() { return S().launches; }
}  // namespace

}  // namespace emu

// csrc/common.h's output allocation (the real one is in csrc/ops/poison.cpp, which registers an
// op of fastmae_ext): here every output starts poisoned, NaN or -1, whatever the tests' setting.
namespace fastmae {
bool poison_outputs() { return true; }
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (at::isFloatingType(out.scalar_type())) out.fill_(std::numeric_limits<double>::quiet_NaN());
  else out.fill_(-1);
  return out;
}
}  // namespace fastmae

TORCH_LIBRARY_FRAGMENT(fastmae_emu, m) {
  m.def("emu_set_order(int order, int seed) -> ()", &emu::set_order);
  m.def("emu_launches() -> int", &emu::launches);
}
