// Host emulation of CUDA's execution model: see cuda_emulation.h for what is
// emulated and why.  One block at a time; its threads are ucontext fibers on
// the calling OS thread, switched only at barriers (run-to-barrier), resumed in
// the order FASTMINE_EMU_SCHEDULE names.
#include "cuda_emulation.h"

#include <pthread.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <deque>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FASTMINE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTMINE_EMU_ASAN 1
#endif
#endif
#if defined(FASTMINE_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switch.  On x86-64 a minimal switch of the callee-saved registers
// (plus the SSE/x87 control words), ~100x cheaper than swapcontext, which
// makes a system call per switch to save the signal mask; elsewhere ucontext.
#if defined(__x86_64__) && !defined(FASTMINE_EMU_UCONTEXT) && !defined(__CET__)  // no shadow stacks
#define FASTMINE_EMU_ASM_SWITCH 1
// void fastmine_emu_switch(void** save_sp, void* load_sp)
asm(R"(
  .text
  .p2align 4
  .type fastmine_emu_switch, @function
fastmine_emu_switch:
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
  .size fastmine_emu_switch, .-fastmine_emu_switch
)");
extern "C" void fastmine_emu_switch(void** save_sp, void* load_sp);
#endif

namespace fastmine {
namespace emu {
namespace {

// A saved execution context: a stack pointer (asm switch) or a ucontext.
struct Context {
#if defined(FASTMINE_EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void switch_context(Context& from, Context& to) {
#if defined(FASTMINE_EMU_ASM_SWITCH)
  fastmine_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

enum class Wait { Running, Block, Warp, Done };

struct Fiber {
  Context ctx;
  uint3 tid;
  int lane = 0, warp = 0;  // linear thread index % 32 and / 32
  Wait wait = Wait::Running;
};

struct Warp {
  int lanes = 0;    // threads of the block in this warp (32 but for a partial last warp)
  int arrived = 0;  // lanes waiting at the warp barrier
  uint64_t slots[32];
  float matrix[3][256];
};

// Which runnable fiber runs next.  Fibers released by one barrier form a group:
//   forward / reverse   the group joins the back of the queue in increasing /
//                       decreasing thread order (every thread advances to its
//                       next barrier before any goes further: lock-step warps);
//   depth               the group goes to the front in increasing order (the
//                       first warp runs as far ahead of the others as the
//                       barriers allow: exposes a missing __syncthreads that
//                       guards shared memory another warp still reads);
//   shuffle[:seed]      random order within the group, front or back at random.
enum class Order { Forward, Reverse, Depth, Shuffle };

struct State {
  // the running launch
  const char* kernel = "";
  dim3 grid, block;
  uint3 bidx{0, 0, 0};
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool in_launch = false;
  // fibers of the running block
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  size_t stack_bytes = 0;
  std::deque<int> runnable;
  int current = -1;  // running fiber, -1: the scheduler
  int nthreads = 0;
  int done = 0;      // fibers of the block that have exited
  int block_arrived = 0;
  std::vector<Warp> warps;
  Context scheduler;
  bool failed = false;
  std::string message;
  // policy and sticky state
  Order order = Order::Forward;
  std::mt19937_64 rng{0};
  bool configured = false;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  pthread_t owner{};      // the one OS thread that may launch (the state is global)
  std::string drop_file;  // FASTMINE_EMU_DROP_BARRIER = file:line (suffix match)
  int drop_line = -1;
#if defined(FASTMINE_EMU_ASAN)
  const void* sched_stack = nullptr;
  size_t sched_stack_size = 0;
#endif
  ~State() {
    for (char* p : stacks) std::free(p);
  }
};

State g_state;
inline State& S() { return g_state; }

void configure() {
  State& s = S();
  if (s.configured) return;
  s.configured = true;
  const char* order = std::getenv("FASTMINE_EMU_SCHEDULE");
  std::string o = order ? order : "forward";
  if (o == "forward") s.order = Order::Forward;
  else if (o == "reverse") s.order = Order::Reverse;
  else if (o == "depth") s.order = Order::Depth;
  else if (o.rfind("shuffle", 0) == 0) {
    s.order = Order::Shuffle;
    const size_t colon = o.find(':');
    s.rng.seed(colon == std::string::npos ? 0 : std::strtoull(o.c_str() + colon + 1, nullptr, 10));
  } else {
    std::fprintf(stderr, "FASTMINE_EMU_SCHEDULE=%s: expected forward, reverse, depth or shuffle[:seed]\n",
                 o.c_str());
    std::abort();
  }
  if (const char* drop = std::getenv("FASTMINE_EMU_DROP_BARRIER")) {
    const std::string d(drop);
    const size_t colon = d.rfind(':');
    if (colon == std::string::npos) {
      std::fprintf(stderr, "FASTMINE_EMU_DROP_BARRIER=%s: expected file:line\n", drop);
      std::abort();
    }
    s.drop_file = d.substr(0, colon);
    s.drop_line = std::atoi(d.c_str() + colon + 1);
  }
  const char* kb = std::getenv("FASTMINE_EMU_STACK_KB");
  const unsigned long stack_kb = kb ? std::strtoul(kb, nullptr, 10) : 256;
  if (stack_kb < 64 || stack_kb > 65536) {
    std::fprintf(stderr, "FASTMINE_EMU_STACK_KB=%s: expected 64 to 65536\n", kb);
    std::abort();
  }
  s.stack_bytes = size_t(stack_kb) * 1024;
  s.owner = pthread_self();
#if defined(FASTMINE_EMU_ASAN)
  // The scheduler runs on the calling thread's stack.
  pthread_attr_t attr;
  void* base = nullptr;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &base, &s.sched_stack_size);
  pthread_attr_destroy(&attr);
  s.sched_stack = base;
#endif
}

// Appends fibers to the run queue in the policy's order.
void make_runnable(std::vector<int>& ids) {
  State& s = S();
  bool front = s.order == Order::Depth;
  if (s.order == Order::Reverse) std::reverse(ids.begin(), ids.end());
  if (s.order == Order::Shuffle) {
    std::shuffle(ids.begin(), ids.end(), s.rng);
    front = s.rng() & 1;
  }
  for (int id : ids) s.fibers[id].wait = Wait::Running;
  if (front) s.runnable.insert(s.runnable.begin(), ids.begin(), ids.end());
  else s.runnable.insert(s.runnable.end(), ids.begin(), ids.end());
}

// Switches from fiber `from` to fiber `to` (-1: the scheduler) and returns when
// something switches back to `from`.  AddressSanitizer is told about every
// change of stack; a fiber that has exited leaves its stack for good.
void transfer(int from, int to) {
  State& s = S();
  Context& a = from < 0 ? s.scheduler : s.fibers[from].ctx;
  Context& b = to < 0 ? s.scheduler : s.fibers[to].ctx;
  s.current = to;
#if defined(FASTMINE_EMU_ASAN)
  void* fake = nullptr;
  const bool leaving_for_good = from >= 0 && s.fibers[from].wait == Wait::Done;
  __sanitizer_start_switch_fiber(leaving_for_good ? nullptr : &fake,
                                 to < 0 ? s.sched_stack : s.stacks[to],
                                 to < 0 ? s.sched_stack_size : s.stack_bytes);
  switch_context(a, b);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  switch_context(a, b);
#endif
}

// The running fiber waits (or has exited): run the next runnable fiber
// directly, or return to the scheduler when there is none.
void yield() {
  State& s = S();
  const int me = s.current;
  int next = -1;
  if (!s.failed && !s.runnable.empty()) {
    next = s.runnable.front();
    s.runnable.pop_front();
    if (next == me) {  // released by its own arrival and first in line
      s.fibers[me].wait = Wait::Running;
      return;
    }
  }
  transfer(me, next);
}

void fiber_main() {
  State& s = S();
#if defined(FASTMINE_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  s.body(s.ctx);
  s.fibers[s.current].wait = Wait::Done;
  ++s.done;
  yield();  // never resumed
}

// A fresh context that starts fiber_main on [stack, stack + bytes).
void init_context(Context& c, char* stack, size_t bytes) {
#if defined(FASTMINE_EMU_ASM_SWITCH)
  // The frame fastmine_emu_switch pops: control words, r15..r12, rbx, rbp, then
  // the return address fiber_main; rsp is then 8 mod 16, as after a call.
  uintptr_t* sp = reinterpret_cast<uintptr_t*>(
      (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--sp = 0;  // fiber_main's (never used) return address slot
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--sp = 0;
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--sp = uintptr_t(csr[0]) | (uintptr_t(csr[1] & 0xffff) << 32);
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // fiber_main never returns
  makecontext(&c.uc, fiber_main, 0);
#endif
}

// Runs the fibers of block s.bidx to completion (or failure).
void run_block() {
  State& s = S();
  const int nt = s.nthreads;
  s.fibers.assign(nt, Fiber{});
  while (int(s.stacks.size()) < nt) s.stacks.push_back(static_cast<char*>(std::malloc(s.stack_bytes)));
  s.warps.assign((nt + 31) / 32, Warp{});
  for (int w = 0; w < int(s.warps.size()); ++w) s.warps[w].lanes = std::min(32, nt - 32 * w);
  s.block_arrived = 0;
  s.runnable.clear();
  std::vector<int> ids(nt);
  for (int t = 0; t < nt; ++t) {
    Fiber& f = s.fibers[t];
    f.tid = uint3{unsigned(t % s.block.x), unsigned(t / s.block.x % s.block.y),
                  unsigned(t / (s.block.x * s.block.y))};
    f.lane = t % 32;
    f.warp = t / 32;
#if defined(FASTMINE_EMU_ASAN)
    // A fiber abandoned mid-kernel (failed launch) leaves its frames' redzones.
    ASAN_UNPOISON_MEMORY_REGION(s.stacks[t], s.stack_bytes);
#endif
    init_context(f.ctx, s.stacks[t], s.stack_bytes);
    ids[t] = t;
  }
  make_runnable(ids);
  s.done = 0;
  while (s.done < nt && !s.failed) {
    if (s.runnable.empty()) {  // nobody can move: a barrier some threads never reach
      int at_block = 0, at_warp = 0, exited = 0;
      for (const Fiber& f : s.fibers) {
        at_block += f.wait == Wait::Block;
        at_warp += f.wait == Wait::Warp;
        exited += f.wait == Wait::Done;
      }
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "deadlock: %d threads wait at __syncthreads, %d at a warp collective, %d have "
                    "exited (a barrier must be reached by every thread of its block/warp)",
                    at_block, at_warp, exited);
      s.failed = true;
      s.message = buf;
      break;
    }
    const int next = s.runnable.front();
    s.runnable.pop_front();
    transfer(-1, next);  // back here when no fiber is runnable (or on failure)
  }
  s.current = -1;
}

bool valid_config(dim3 g, dim3 b) {
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  return threads >= 1 && threads <= 1024 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && g.x >= 1 &&
         g.x <= 0x7fffffffu && g.y >= 1 && g.y <= 65535 && g.z >= 1 && g.z <= 65535;
}

Fiber& current_fiber(const char* what) {
  State& s = S();
  if (s.current < 0) {
    std::fprintf(stderr, "fastmine CUDA emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return s.fibers[s.current];
}

}  // namespace

const uint3& thread_idx() { return current_fiber("threadIdx").tid; }
const uint3& block_idx() { return S().bidx; }
const dim3& block_dim() { return S().block; }
const dim3& grid_dim() { return S().grid; }

int lane_id() { return current_fiber("lane id").lane; }

namespace {
int warp_id() { return current_fiber("warp id").warp; }
}  // namespace

uint64_t* warp_slots() { return S().warps[warp_id()].slots; }
float* warp_matrix(int which) { return S().warps[warp_id()].matrix[which]; }

void fail(const char* fmt, ...) {
  State& s = S();
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (s.current < 0) {
    std::fprintf(stderr, "fastmine CUDA emulation: %s\n", buf);
    std::abort();
  }
  s.failed = true;
  s.message = buf;
  s.fibers[s.current].wait = Wait::Done;
  transfer(s.current, -1);  // the scheduler abandons the block: never resumed
  std::abort();
}

void sync_block(const char* file, int line) {
  State& s = S();
  Fiber& me = current_fiber("__syncthreads");
  if (!s.drop_file.empty() && line == s.drop_line) {  // fault injection
    const std::string f(file);
    if (f.size() >= s.drop_file.size() &&
        f.compare(f.size() - s.drop_file.size(), s.drop_file.size(), s.drop_file) == 0)
      return;
  }
  me.wait = Wait::Block;
  if (++s.block_arrived == s.nthreads) {
    s.block_arrived = 0;
    std::vector<int> ids;
    for (int t = 0; t < s.nthreads; ++t)
      if (s.fibers[t].wait == Wait::Block) ids.push_back(t);
    make_runnable(ids);
  }
  yield();
}

void sync_warp(unsigned mask) {
  State& s = S();
  current_fiber("warp collective").wait = Wait::Warp;
  const int w = warp_id();
  Warp& warp = s.warps[w];
  const unsigned full = warp.lanes == 32 ? 0xffffffffu : (1u << warp.lanes) - 1u;
  if (mask != full && mask != 0xffffffffu)
    fail("warp collective with mask 0x%x: only whole-warp masks are emulated", mask);
  if (mask == 0xffffffffu && warp.lanes != 32)
    fail("warp collective with mask 0xffffffff in a partial warp of %d lanes", warp.lanes);
  if (++warp.arrived == warp.lanes) {
    warp.arrived = 0;
    std::vector<int> ids;
    for (int l = 0; l < warp.lanes; ++l)
      if (s.fibers[32 * w + l].wait == Wait::Warp) ids.push_back(32 * w + l);
    make_runnable(ids);
  }
  yield();
}

cudaError_t launch(dim3 grid, dim3 block, const char* kernel_name, void (*body)(void*), void* ctx) {
  State& s = S();
  configure();
  if (s.in_launch) {
    std::fprintf(stderr, "fastmine CUDA emulation: kernel launched from a kernel\n");
    std::abort();
  }
  if (!pthread_equal(s.owner, pthread_self())) {
    std::fprintf(stderr, "fastmine CUDA emulation: launches must come from one OS thread\n");
    std::abort();
  }
  if (!valid_config(grid, block)) {
    s.last_error = cudaErrorInvalidConfiguration;
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: invalid launch configuration grid (%u, %u, %u) block (%u, %u, %u)",
                  kernel_name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    s.last_message = buf;
    return s.last_error;
  }
  s.in_launch = true;
  s.kernel = kernel_name;
  s.grid = grid;
  s.block = block;
  s.body = body;
  s.ctx = ctx;
  s.nthreads = int(block.x * block.y * block.z);
  s.failed = false;
  // Blocks are independent: the policy orders them too (x fastest for forward
  // and depth, the reverse, or a random permutation).
  std::vector<uint3> blocks;
  blocks.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (s.order == Order::Reverse) std::reverse(blocks.begin(), blocks.end());
  if (s.order == Order::Shuffle) std::shuffle(blocks.begin(), blocks.end(), s.rng);
  for (size_t b = 0; b < blocks.size() && !s.failed; ++b) {
    s.bidx = blocks[b];
    run_block();
  }
  s.in_launch = false;
  if (s.failed) {
    s.last_error = cudaErrorLaunchFailure;
    s.last_message = std::string(kernel_name) + " block (" + std::to_string(s.bidx.x) + ", " +
                     std::to_string(s.bidx.y) + ", " + std::to_string(s.bidx.z) + "): " + s.message;
    std::fprintf(stderr, "fastmine CUDA emulation: %s\n", s.last_message.c_str());
    return s.last_error;
  }
  return cudaSuccess;
}

}  // namespace emu
}  // namespace fastmine

// ------------------------------------------------------------ runtime API
// Every definition below is hidden: it binds inside the library or program
// that links this file and is never exported.  A torch built with CUDA loads
// the real libcudart into the process's global scope (libtorch_global_deps),
// and exported definitions would lose to it: the emulated launcher's
// cudaDeviceGetAttribute, cudaMemsetAsync, cudaGetLastError, ... would call the
// real runtime, which on a machine without a GPU (or driver) fails with
// "CUDA driver version is insufficient", and on one with a GPU would operate on
// host pointers.  The linker applies the most constraining visibility of all
// declarations, so the callers' plain declarations (cuda_runtime_api.h) bind
// here too.  tests/test_cuda_emulation.py checks both the symbol table and a
// process where a stand-in libcudart is loaded first.
#define FASTMINE_EMU_RUNTIME __attribute__((visibility("hidden")))
using fastmine::emu::S;

FASTMINE_EMU_RUNTIME cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (posix_memalign(p, 256, bytes) != 0) return cudaErrorMemoryAllocation;
  std::memset(*p, 0x7f, bytes);  // conspicuous, never a valid index or -1
  return cudaSuccess;
}

FASTMINE_EMU_RUNTIME cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}

FASTMINE_EMU_RUNTIME cudaError_t cudaMemcpy(void* dst, const void* src, size_t count,
                                            enum cudaMemcpyKind) {
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}

FASTMINE_EMU_RUNTIME cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count,
                                                 enum cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, count, kind);
}

FASTMINE_EMU_RUNTIME cudaError_t cudaMemset(void* p, int value, size_t count) {
  if (count) std::memset(p, value, count);
  return cudaSuccess;
}

FASTMINE_EMU_RUNTIME cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  return cudaMemset(p, value, count);
}

FASTMINE_EMU_RUNTIME cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
FASTMINE_EMU_RUNTIME cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

FASTMINE_EMU_RUNTIME cudaError_t cudaGetLastError(void) {
  const cudaError_t e = S().last_error;
  S().last_error = cudaSuccess;
  return e;
}

FASTMINE_EMU_RUNTIME cudaError_t cudaPeekAtLastError(void) { return S().last_error; }

FASTMINE_EMU_RUNTIME const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    default: return "cudaError (emulated)";
  }
}

FASTMINE_EMU_RUNTIME const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  static std::string text;  // the emulator's detailed message for the last failed launch
  text = std::string(cudaGetErrorName(e)) + " (emulated): " + S().last_message;
  return text.c_str();
}

FASTMINE_EMU_RUNTIME cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

// FASTMINE_EMU_SMS sets the multiprocessor count (default 132, an H100 SXM),
// which the kernels' split heuristic reads.
FASTMINE_EMU_RUNTIME cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr,
                                                        int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    const char* sms = std::getenv("FASTMINE_EMU_SMS");
    *value = sms ? std::atoi(sms) : 132;
    return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
