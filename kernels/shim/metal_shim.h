// metal_shim.h: the subset of the Metal Shading Language that kernels/*.metal uses, in C++20,
// plus a small runtime that executes one MLX-style compute dispatch on the CPU.
//
// What is modelled
//   * address spaces: `device`, `constant` and `thread` are empty (one flat memory); a
//     `threadgroup` variable becomes `static thread_local`, i.e. one copy shared by every
//     thread of the threadgroup that is running (threadgroups run one at a time per OS thread).
//     Only threadgroup *arrays declared in the kernel body* are supported (no threadgroup
//     pointers or references); kernels/check_kernels.py lints for that.
//   * types: uint, ushort, uint3, half and float16_t (_Float16, IEEE binary16, round-to-nearest-even
//     conversions), bfloat16_t (MLX's name for bfloat; float -> bfloat rounds to nearest even,
//     conversions are explicit).
//   * metal:: math that the kernels use (exp, fast::exp, precise::exp, max, min, abs, fma,
//     sqrt, rsqrt, select).
//   * threads: every GPU thread of a threadgroup is a fiber with its own stack. A fiber runs
//     until it reaches a barrier or a SIMD-group function, where it blocks until the other
//     participants arrive. threadgroup_barrier waits for every thread of the threadgroup;
//     simd_* functions wait for all 32 lanes of the SIMD-group and then compute the result from
//     all lanes' values. The order in which runnable fibers are resumed is a policy
//     (forward, reverse, seeded random), so code that relies on an unsynchronised order
//     between threads gives schedule-dependent results.
//   * strictness: a SIMD-group function must be reached by every lane of its SIMD-group at the
//     same call site, and a barrier by every thread of the threadgroup at the same call site;
//     otherwise the run stops with "divergence" or "deadlock" and exit status 3. Shuffles from
//     lanes that do not exist stop the run too.
//
// What is not modelled: real GPU scheduling and lock-step execution, memory ordering beyond
// what barriers give (one flat, sequentially consistent memory), the mem_flags distinctions,
// threadgroup memory limits, non-uniform threadgroups, Metal's exact ULP bounds for math
// functions, half/bfloat arithmetic (the kernels convert to float before doing arithmetic),
// and whether Apple's compiler accepts the source.
#pragma once

// Context switch: a few lines of assembly on x86-64 ELF (glibc's swapcontext makes a system call
// per switch, about 50x slower); ucontext elsewhere, or with -DMTP_SHIM_UCONTEXT.
#if defined(__x86_64__) && defined(__ELF__) && !defined(MTP_SHIM_UCONTEXT)
#define MTP_SHIM_ASM_SWITCH 1
#else
#if defined(__APPLE__)
#define _XOPEN_SOURCE 700  // macOS exposes the (deprecated) ucontext routines only with it
#define _DARWIN_C_SOURCE 1
#endif
#endif

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <source_location>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>
#if !defined(MTP_SHIM_ASM_SWITCH)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// Scalar and vector types
// ---------------------------------------------------------------------------------------------

typedef unsigned int uint;
typedef unsigned short ushort;

struct uint3 {
  uint x, y, z;
};

using half = _Float16;
using float16_t = half;  // MLX's name for half (the type string it writes for float16 arrays)

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
      bits = uint16_t(u >> 16);
    }
  }
  explicit operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(std::is_trivially_copyable_v<bfloat16_t> && sizeof(bfloat16_t) == 2);

// ---------------------------------------------------------------------------------------------
// Fiber runtime (defined before the address-space macros so that no library header sees them)
// ---------------------------------------------------------------------------------------------

namespace shim {

// Attribute values of one thread; field names are the Metal attribute names, so the generated
// launcher can pass `t.<attribute>` for each attribute MLX put in the signature.
struct Lane {
  uint dispatch_quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup;
  uint3 grid_origin;
  uint3 grid_size;
  uint quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
  uint thread_index_in_quadgroup;
  uint thread_index_in_simdgroup;
  uint thread_index_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

enum class Policy : uint32_t { Forward = 0, Reverse = 1, Random = 2 };
enum class State : uint8_t { Runnable, WaitSimd, WaitBarrier, Done };

constexpr int kSimdWidth = 32;
constexpr int kSlotBytes = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "shim error: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::_Exit(3);
}

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

struct SimdGroup {
  int first = 0;    // thread index of lane 0
  int nlanes = 0;   // lanes that exist (32 unless the threadgroup size is not a multiple of 32)
  int arrived = 0;  // lanes blocked in the current SIMD-group function
  const char* op = nullptr;
  std::source_location site;
  long completed = 0;
  alignas(16) unsigned char in[kSimdWidth][kSlotBytes];
  alignas(16) unsigned char out[kSimdWidth][kSlotBytes];
};

struct Fiber {
  void* sp = nullptr;
  State state = State::Runnable;
#if !defined(MTP_SHIM_ASM_SWITCH)
  ucontext_t uc;
#endif
};

struct Run {
  int n = 0;  // threads in the threadgroup
  int done = 0;
  int current = -1;
  std::vector<Fiber> fibers;
  std::vector<Lane> lanes;
  std::vector<SimdGroup> simdgroups;
  int barrier_arrived = 0;
  std::source_location barrier_site;
  long barriers_completed = 0;
  void* sched_sp = nullptr;
#if !defined(MTP_SHIM_ASM_SWITCH)
  ucontext_t sched_uc;
#endif
  const std::function<void(const Lane&)>* body = nullptr;
  // scheduling
  Policy policy = Policy::Forward;
  std::mt19937_64 rng;
  std::vector<int> order;
  int cursor = 0;
  // statistics
  long switches = 0;
};

inline thread_local Run* g_run = nullptr;

struct Stacks {
  std::vector<char*> base;  // each: guard page + kStackBytes
  char* get(int i) {
    while (int(base.size()) <= i) {
      size_t page = size_t(sysconf(_SC_PAGESIZE));
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
      mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
      base.push_back(static_cast<char*>(p) + page);
    }
    return base[size_t(i)];
  }
};
inline thread_local Stacks g_stacks;

}  // namespace shim

#if defined(MTP_SHIM_ASM_SWITCH)
// switch(save_sp, new_sp): saves callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save_sp, and resumes the context saved at new_sp.
extern "C" void mtp_shim_switch(void** save_sp, void* new_sp);
extern "C" void mtp_shim_trampoline();
extern "C" void mtp_shim_fiber_entry();
asm(R"(
  .text
  .globl mtp_shim_switch
  .type mtp_shim_switch,@function
mtp_shim_switch:
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
  .size mtp_shim_switch,.-mtp_shim_switch

  .globl mtp_shim_trampoline
  .type mtp_shim_trampoline,@function
mtp_shim_trampoline:
  call mtp_shim_fiber_entry
  ud2
  .size mtp_shim_trampoline,.-mtp_shim_trampoline
)");
#else
extern "C" void mtp_shim_fiber_entry();
#endif

namespace shim {

inline void to_scheduler() {
  Run& r = *g_run;
  ++r.switches;
#if defined(MTP_SHIM_ASM_SWITCH)
  mtp_shim_switch(&r.fibers[size_t(r.current)].sp, r.sched_sp);
#else
  swapcontext(&r.fibers[size_t(r.current)].uc, &r.sched_uc);
#endif
}

inline void to_fiber(int i) {
  Run& r = *g_run;
  r.current = i;
  ++r.switches;
#if defined(MTP_SHIM_ASM_SWITCH)
  mtp_shim_switch(&r.sched_sp, r.fibers[size_t(i)].sp);
#else
  swapcontext(&r.sched_uc, &r.fibers[size_t(i)].uc);
#endif
}

inline void init_fiber(int i) {
  Run& r = *g_run;
  char* stack = g_stacks.get(i);
#if defined(MTP_SHIM_ASM_SWITCH)
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t csr[2] = {0x1f80u, 0x037fu};  // default MXCSR, default x87 control word
  std::memcpy(&sp[0], csr, 8);
  for (int k = 1; k <= 6; ++k) sp[k] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&mtp_shim_trampoline);
  r.fibers[size_t(i)].sp = sp;
#else
  ucontext_t& uc = r.fibers[size_t(i)].uc;
  getcontext(&uc);
  uc.uc_stack.ss_sp = stack;
  uc.uc_stack.ss_size = kStackBytes;
  uc.uc_link = nullptr;
  makecontext(&uc, mtp_shim_fiber_entry, 0);
#endif
  r.fibers[size_t(i)].state = State::Runnable;
}

inline const char* state_name(State s) {
  switch (s) {
    case State::Runnable: return "runnable";
    case State::WaitSimd: return "waiting in a SIMD-group function";
    case State::WaitBarrier: return "waiting at a threadgroup barrier";
    case State::Done: return "returned";
  }
  return "?";
}

[[noreturn]] inline void report_deadlock() {
  Run& r = *g_run;
  std::string msg = "deadlock in threadgroup (" +
                    std::to_string(r.lanes[0].threadgroup_position_in_grid.x) + "," +
                    std::to_string(r.lanes[0].threadgroup_position_in_grid.y) + "," +
                    std::to_string(r.lanes[0].threadgroup_position_in_grid.z) +
                    "): a barrier or SIMD-group function was not reached by every participant.";
  for (size_t g = 0; g < r.simdgroups.size(); ++g) {
    const SimdGroup& s = r.simdgroups[g];
    int counts[4] = {0, 0, 0, 0};
    for (int l = 0; l < s.nlanes; ++l) counts[int(r.fibers[size_t(s.first + l)].state)]++;
    msg += "\n  simdgroup " + std::to_string(g) + ": ";
    for (int k = 0; k < 4; ++k)
      if (counts[k]) msg += std::to_string(counts[k]) + " " + state_name(State(k)) + "; ";
    if (s.arrived) msg += std::string("pending ") + s.op + " at line " + std::to_string(s.site.line());
  }
  if (r.barrier_arrived)
    msg += "\n  pending barrier at line " + std::to_string(r.barrier_site.line());
  fail("%s", msg.c_str());
}

inline int pick_runnable() {
  Run& r = *g_run;
  for (int k = 0; k < r.n; ++k) {
    int i = r.order[size_t(r.cursor)];
    if (++r.cursor == r.n) {
      r.cursor = 0;
      if (r.policy == Policy::Random) std::shuffle(r.order.begin(), r.order.end(), r.rng);
    }
    if (r.fibers[size_t(i)].state == State::Runnable) return i;
  }
  for (int i = 0; i < r.n; ++i)
    if (r.fibers[size_t(i)].state == State::Runnable) return i;
  return -1;
}

// Runs one threadgroup to completion. `lanes` holds every thread's attributes.
inline void run_threadgroup(Run& r) {
  g_run = &r;
  r.n = int(r.lanes.size());
  if (r.n > kMaxThreads) fail("threadgroup of %d threads exceeds %d", r.n, kMaxThreads);
  r.done = 0;
  r.barrier_arrived = 0;
  r.fibers.assign(size_t(r.n), Fiber{});
  r.simdgroups.assign(size_t((r.n + kSimdWidth - 1) / kSimdWidth), SimdGroup{});
  for (size_t g = 0; g < r.simdgroups.size(); ++g) {
    r.simdgroups[g].first = int(g) * kSimdWidth;
    r.simdgroups[g].nlanes = std::min(kSimdWidth, r.n - int(g) * kSimdWidth);
  }
  r.order.resize(size_t(r.n));
  for (int i = 0; i < r.n; ++i)
    r.order[size_t(i)] = r.policy == Policy::Reverse ? r.n - 1 - i : i;
  if (r.policy == Policy::Random) std::shuffle(r.order.begin(), r.order.end(), r.rng);
  r.cursor = 0;
  for (int i = 0; i < r.n; ++i) init_fiber(i);
  while (r.done < r.n) {
    int i = pick_runnable();
    if (i < 0) report_deadlock();
    to_fiber(i);
  }
  g_run = nullptr;
}

// Simdgroup function: every lane deposits `x`; when the last lane of the SIMD-group arrives,
// `compute(values, nlanes, lane)` gives each lane its result.
template <class R, class T, class F>
R simd_collective(const char* op, const T& x, F&& compute, const std::source_location& site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= kSlotBytes);
  static_assert(std::is_trivially_copyable_v<R> && sizeof(R) <= kSlotBytes);
  if (!g_run) fail("SIMD-group function called outside a kernel");
  Run& r = *g_run;
  const int me = r.current;
  const Lane& L = r.lanes[size_t(me)];
  SimdGroup& s = r.simdgroups[L.simdgroup_index_in_threadgroup];
  const int lane = int(L.thread_index_in_simdgroup);
  if (s.arrived == 0) {
    s.op = op;
    s.site = site;
  } else if (std::strcmp(s.op, op) != 0 || !same_site(s.site, site)) {
    fail("SIMD-group divergence: lane %d of simdgroup %u reached %s at line %u while other lanes "
         "wait in %s at line %u",
         lane, L.simdgroup_index_in_threadgroup, op, site.line(), s.op, s.site.line());
  }
  std::memcpy(s.in[lane], &x, sizeof(T));
  r.fibers[size_t(me)].state = State::WaitSimd;
  if (++s.arrived == s.nlanes) {
    T vals[kSimdWidth];
    for (int l = 0; l < s.nlanes; ++l) std::memcpy(&vals[l], s.in[l], sizeof(T));
    for (int l = 0; l < s.nlanes; ++l) {
      R res = compute(vals, s.nlanes, l);
      std::memcpy(s.out[l], &res, sizeof(R));
    }
    s.arrived = 0;
    ++s.completed;
    for (int l = 0; l < s.nlanes; ++l) r.fibers[size_t(s.first + l)].state = State::Runnable;
  }
  to_scheduler();
  R res;
  std::memcpy(&res, s.out[lane], sizeof(R));
  return res;
}

inline void barrier(const std::source_location& site) {
  if (!g_run) fail("barrier called outside a kernel");
  Run& r = *g_run;
  if (r.barrier_arrived == 0) {
    r.barrier_site = site;
  } else if (!same_site(r.barrier_site, site)) {
    fail("barrier divergence: thread %d reached the barrier at line %u while others wait at line %u",
         r.current, site.line(), r.barrier_site.line());
  }
  r.fibers[size_t(r.current)].state = State::WaitBarrier;
  if (++r.barrier_arrived == r.n) {
    r.barrier_arrived = 0;
    ++r.barriers_completed;
    for (auto& f : r.fibers) f.state = State::Runnable;
  }
  to_scheduler();
}

template <class T>
T tree_sum(const T* v, int n) {  // pairwise, like a butterfly reduction
  T buf[kSimdWidth];
  for (int i = 0; i < n; ++i) buf[i] = v[i];
  for (int w = 1; w < n; w *= 2)
    for (int i = 0; i + w < n; i += 2 * w) buf[i] = buf[i] + buf[i + w];
  return buf[0];
}

}  // namespace shim

extern "C" __attribute__((used)) void mtp_shim_fiber_entry() {
  shim::Run& r = *shim::g_run;
  const int me = r.current;
  (*r.body)(r.lanes[size_t(me)]);
  r.fibers[size_t(me)].state = shim::State::Done;
  ++r.done;
  shim::to_scheduler();
  shim::fail("a finished fiber was resumed");
}

// ---------------------------------------------------------------------------------------------
// metal:: functions
// ---------------------------------------------------------------------------------------------

namespace metal {

enum class mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }

inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
}  // namespace precise

template <class T>
inline T max(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) return std::fmax(a, b);  // NaN-ignoring like fmax
  else return a < b ? b : a;
}
template <class T>
inline T min(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) return std::fmin(a, b);
  else return b < a ? b : a;
}
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }

inline void threadgroup_barrier(mem_flags,
                                std::source_location site = std::source_location::current()) {
  shim::barrier(site);
}

template <class T>
inline T simd_sum(T x, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<T>("simd_sum", x,
      [](const T* v, int n, int) { return shim::tree_sum(v, n); }, site);
}
template <class T>
inline T simd_max(T x, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<T>("simd_max", x, [](const T* v, int n, int) {
    T m = v[0];
    for (int i = 1; i < n; ++i) m = metal::max(m, v[i]);
    return m;
  }, site);
}
template <class T>
inline T simd_min(T x, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<T>("simd_min", x, [](const T* v, int n, int) {
    T m = v[0];
    for (int i = 1; i < n; ++i) m = metal::min(m, v[i]);
    return m;
  }, site);
}
inline bool simd_any(bool x, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<bool>("simd_any", x, [](const bool* v, int n, int) {
    for (int i = 0; i < n; ++i) if (v[i]) return true;
    return false;
  }, site);
}
inline bool simd_all(bool x, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<bool>("simd_all", x, [](const bool* v, int n, int) {
    for (int i = 0; i < n; ++i) if (!v[i]) return false;
    return true;
  }, site);
}

namespace detail {
template <class T>
struct WithLane {
  T value;
  ushort lane;
};
}  // namespace detail

template <class T>
inline T simd_shuffle(T x, ushort src, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<T>("simd_shuffle", detail::WithLane<T>{x, src},
      [](const detail::WithLane<T>* v, int n, int l) {
        if (int(v[l].lane) >= n) shim::fail("simd_shuffle from lane %d, which does not exist", int(v[l].lane));
        return v[v[l].lane].value;
      }, site);
}
template <class T>
inline T simd_shuffle_xor(T x, ushort mask, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<T>("simd_shuffle_xor", detail::WithLane<T>{x, mask},
      [](const detail::WithLane<T>* v, int n, int l) {
        int src = l ^ int(v[l].lane);
        if (src >= n) shim::fail("simd_shuffle_xor from lane %d, which does not exist", src);
        return v[src].value;
      }, site);
}
template <class T>
inline T simd_broadcast(T x, ushort src, std::source_location site = std::source_location::current()) {
  return shim::simd_collective<T>("simd_broadcast", detail::WithLane<T>{x, src},
      [](const detail::WithLane<T>* v, int n, int l) {
        if (v[l].lane != v[0].lane) shim::fail("simd_broadcast with a lane index that is not uniform");
        if (int(v[l].lane) >= n) shim::fail("simd_broadcast from lane %d, which does not exist", int(v[l].lane));
        return v[v[l].lane].value;
      }, site);
}

}  // namespace metal

// MLX's preamble brings namespace metal into scope.
using namespace metal;

// ---------------------------------------------------------------------------------------------
// Dispatch: reads a case file, runs the grid, writes the outputs (used by the generated main)
// ---------------------------------------------------------------------------------------------

namespace shim {

enum DType : uint32_t { F32 = 0, F16 = 1, BF16 = 2, I32 = 3 };

struct Buffer {
  uint32_t dtype = 0;
  std::vector<int> shape;
  std::vector<int64_t> strides;  // row-contiguous, in elements (MLX passes int64 strides)
  int ndim = 0;
  std::vector<unsigned char> data;
  template <class T>
  T* as() { return reinterpret_cast<T*>(data.data()); }
};

struct Case {
  Policy policy = Policy::Forward;
  uint64_t seed = 0;
  uint32_t grid[3] = {1, 1, 1};
  uint32_t tg[3] = {1, 1, 1};
  std::vector<Buffer> inputs;
  std::vector<Buffer> outputs;
};

inline void read_exact(FILE* f, void* p, size_t n) {
  if (n && std::fread(p, 1, n, f) != n) fail("truncated case file");
}

inline Case read_case(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) fail("cannot open %s", path);
  Case c;
  char magic[4];
  read_exact(f, magic, 4);
  if (std::memcmp(magic, "MTPK", 4) != 0) fail("%s is not a case file", path);
  uint32_t head[8];
  read_exact(f, head, sizeof head);
  c.policy = Policy(head[0]);
  c.seed = head[1];
  for (int d = 0; d < 3; ++d) c.grid[d] = head[2 + d], c.tg[d] = head[5 + d];
  auto read_buffers = [&](std::vector<Buffer>& out, bool with_data) {
    uint32_t n;
    read_exact(f, &n, 4);
    out.resize(n);
    for (auto& b : out) {
      uint32_t meta[2];
      read_exact(f, meta, 8);
      b.dtype = meta[0];
      b.ndim = int(meta[1]);
      b.shape.resize(size_t(b.ndim));
      read_exact(f, b.shape.data(), 4 * size_t(b.ndim));
      b.strides.assign(size_t(b.ndim), 1);
      for (int d = b.ndim - 2; d >= 0; --d) b.strides[size_t(d)] = b.strides[size_t(d) + 1] * b.shape[size_t(d) + 1];
      uint64_t nbytes;
      read_exact(f, &nbytes, 8);
      b.data.resize(size_t(nbytes) + 64);  // slack keeps pointers valid for empty buffers
      if (with_data) read_exact(f, b.data.data(), size_t(nbytes));
    }
  };
  read_buffers(c.inputs, true);
  read_buffers(c.outputs, false);  // outputs: dtype, shape and size only
  std::fclose(f);
  // Outputs start as all-ones bytes (NaN in every float format): unwritten elements show up.
  for (auto& b : c.outputs) std::fill(b.data.begin(), b.data.end(), (unsigned char)0xff);
  return c;
}

inline void expect_dtype(const Case& c, bool input, size_t i, uint32_t dtype, const char* name) {
  const auto& v = input ? c.inputs : c.outputs;
  if (i >= v.size()) fail("case file lacks buffer %s", name);
  if (v[i].dtype != dtype) fail("buffer %s has dtype code %u, the kernel was built for %u", name, v[i].dtype, dtype);
}

inline void write_outputs(const Case& c, const char* path, long switches) {
  FILE* f = std::fopen(path, "wb");
  if (!f) fail("cannot write %s", path);
  for (const auto& b : c.outputs) std::fwrite(b.data.data(), 1, b.data.size() - 64, f);
  std::fclose(f);
  std::fprintf(stdout, "switches %ld\n", switches);
}

// Runs the dispatch like MLX does: dispatchThreads(grid, min(threadgroup, grid)).
inline long run_grid(Case& c, const std::function<void(const Lane&)>& body) {
  uint32_t tg[3], ntg[3];
  for (int d = 0; d < 3; ++d) {
    tg[d] = std::min(c.tg[d], c.grid[d]);
    if (tg[d] == 0) fail("empty grid");
    if (c.grid[d] % tg[d] != 0) fail("non-uniform threadgroups are not modelled (grid %u, threadgroup %u)", c.grid[d], tg[d]);
    ntg[d] = c.grid[d] / tg[d];
  }
  const uint32_t nthreads = tg[0] * tg[1] * tg[2];
  std::vector<uint3> groups;
  for (uint32_t z = 0; z < ntg[2]; ++z)
    for (uint32_t y = 0; y < ntg[1]; ++y)
      for (uint32_t x = 0; x < ntg[0]; ++x) groups.push_back({x, y, z});
  Run r;
  r.policy = c.policy;
  r.rng.seed(c.seed * 0x9e3779b97f4a7c15ull + 1);
  if (c.policy == Policy::Reverse) std::reverse(groups.begin(), groups.end());
  if (c.policy == Policy::Random) std::shuffle(groups.begin(), groups.end(), r.rng);
  r.body = &body;
  long switches = 0;
  for (const uint3& g : groups) {
    r.lanes.assign(nthreads, Lane{});
    for (uint32_t i = 0; i < nthreads; ++i) {
      Lane& t = r.lanes[i];
      uint3 p = {i % tg[0], (i / tg[0]) % tg[1], i / (tg[0] * tg[1])};
      t.thread_position_in_threadgroup = p;
      t.threadgroup_position_in_grid = g;
      t.thread_position_in_grid = {g.x * tg[0] + p.x, g.y * tg[1] + p.y, g.z * tg[2] + p.z};
      t.threads_per_threadgroup = {tg[0], tg[1], tg[2]};
      t.dispatch_threads_per_threadgroup = {tg[0], tg[1], tg[2]};
      t.threadgroups_per_grid = {ntg[0], ntg[1], ntg[2]};
      t.threads_per_grid = {c.grid[0], c.grid[1], c.grid[2]};
      t.grid_size = t.threads_per_grid;
      t.grid_origin = {0, 0, 0};
      t.thread_index_in_threadgroup = i;
      t.simdgroup_index_in_threadgroup = i / kSimdWidth;
      t.thread_index_in_simdgroup = i % kSimdWidth;
      t.simdgroups_per_threadgroup = (nthreads + kSimdWidth - 1) / kSimdWidth;
      t.dispatch_simdgroups_per_threadgroup = t.simdgroups_per_threadgroup;
      t.thread_execution_width = kSimdWidth;
      t.threads_per_simdgroup = kSimdWidth;
      t.quadgroup_index_in_threadgroup = i / 4;
      t.thread_index_in_quadgroup = i % 4;
      t.quadgroups_per_threadgroup = (nthreads + 3) / 4;
      t.dispatch_quadgroups_per_threadgroup = t.quadgroups_per_threadgroup;
    }
    run_threadgroup(r);
    switches += r.switches;
    r.switches = 0;
  }
  return switches;
}

}  // namespace shim

// ---------------------------------------------------------------------------------------------
// Address spaces (last, so that no library header above sees these macros)
// ---------------------------------------------------------------------------------------------
#define device
#define constant
#define thread
#define threadgroup static thread_local
