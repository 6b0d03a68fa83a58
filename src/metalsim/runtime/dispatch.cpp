// metalsim_dispatch: validate a dispatch, place each buffer against guard pages, run every
// threadgroup, turn faults (out-of-bounds access, stack overflow, division by zero) and hangs into
// an error message naming the thread and the buffer, and copy results back.
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __APPLE__
#include <sys/ucontext.h>  // <ucontext.h> insists on _XOPEN_SOURCE there
#else
#include <ucontext.h>
#endif

#include <chrono>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "internal.h"

#define MS_EXPORT extern "C" __attribute__((visibility("default")))

namespace metalsim::rt {
namespace {

std::size_t page_size() {
  return std::size_t(sysconf(_SC_PAGESIZE));
}
std::size_t round_up(std::size_t x, std::size_t a) {
  return (x + a - 1) / a * a;
}

// One buffer: [guard page][slack][data][guard page], or [guard][data][slack][guard] when it
// is bound at an offset (see map_buffer).
struct Mapping {
  int index = -1;
  const char* name = "?";
  const ms_binding* binding = nullptr;
  unsigned char* base = nullptr;
  std::size_t map_bytes = 0;
  unsigned char* data = nullptr;
  std::size_t nbytes = 0;
  unsigned char* data_pages = nullptr;  // page-aligned start of the pages holding data
  unsigned char* end_guard = nullptr;   // page-aligned
  bool read_only = false;               // bound to a const parameter, or set_bytes data
};

struct StackPool {  // fiber stacks, each with a guard page below it; kept between dispatches
  std::vector<char*> lo;
  std::size_t bytes = 0;
  void ensure(std::size_t count, std::size_t stack_bytes) {
    if (stack_bytes != bytes) release();
    bytes = stack_bytes;
    const std::size_t page = page_size();
    while (lo.size() < count) {
      void* m = mmap(nullptr, stack_bytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) throw std::bad_alloc();
      mprotect(m, page, PROT_NONE);
      lo.push_back(static_cast<char*>(m) + page);
    }
  }
  void release() {
    for (char* p : lo) munmap(p - page_size(), bytes + page_size());
    lo.clear();
  }
};
StackPool stack_pool;

// Where a fault can be explained from; valid while a dispatch runs.
struct Active {
  std::vector<Mapping>* maps = nullptr;
  Group* group = nullptr;
  std::size_t stack_bytes = 0;
  int mode = MS_MODE_FIBER;
} active;

// Recovery point for faults and the watchdog: the scheduler (fiber mode) or the worker thread.
struct Recovery {
  sigjmp_buf jb;
  volatile sig_atomic_t armed = 0;
  int sig = 0;
  void* addr = nullptr;
  int is_write = -1;
  ThreadCtx* thread = nullptr;
};
thread_local Recovery tls_recovery;

const int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGUSR2};
struct sigaction old_actions[5];

int fault_is_write(void* uc) {
#if defined(__linux__) && defined(__x86_64__)
  return (static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#elif defined(__APPLE__) && defined(__x86_64__)
  return (static_cast<ucontext_t*>(uc)->uc_mcontext->__es.__err & 2) ? 1 : 0;
#else
  (void)uc;
  return -1;
#endif
}

void on_signal(int sig, siginfo_t* si, void* uc) {
  Recovery& r = tls_recovery;
  if (!r.armed) {
    // Not ours (another thread, or outside a kernel): hand the signal to whoever had it.
    for (int i = 0; i < 5; ++i)
      if (kSignals[i] == sig) sigaction(sig, &old_actions[i], nullptr);
    if (sig == SIGUSR2) return;
    return;  // the faulting instruction runs again and reaches the previous handler
  }
  r.armed = 0;
  r.sig = sig;
  r.addr = si->si_addr;
  r.is_write = sig == SIGSEGV || sig == SIGBUS ? fault_is_write(uc) : -1;
  r.thread = tls_current;
  siglongjmp(r.jb, 1);
}

struct SignalScope {  // our handlers and an alternate signal stack, for one dispatch
  stack_t old_stack{};
  std::unique_ptr<char[]> stack;
  SignalScope() {
    struct sigaction sa {};
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 5; ++i) sigaction(kSignals[i], &sa, &old_actions[i]);
    install_alt_stack(stack, &old_stack);
  }
  ~SignalScope() {
    sigaltstack(&old_stack, nullptr);
    for (int i = 0; i < 5; ++i) sigaction(kSignals[i], &old_actions[i], nullptr);
  }
  static void install_alt_stack(std::unique_ptr<char[]>& mem, stack_t* old) {
    const std::size_t size = 256 * 1024;
    mem.reset(new char[size]);
    stack_t ss{};
    ss.ss_sp = mem.get();
    ss.ss_size = size;
    sigaltstack(&ss, old);
  }
};

// A watchdog for fiber mode: a kernel that never finishes (an infinite loop) is interrupted.
struct Watchdog {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread th;
  Watchdog(uint32_t seconds, pthread_t target) {
    if (!seconds) return;
    th = std::thread([this, seconds, target] {
      std::unique_lock<std::mutex> lk(mu);
      if (!cv.wait_for(lk, std::chrono::seconds(seconds), [this] { return done; }))
        pthread_kill(target, SIGUSR2);
    });
  }
  ~Watchdog() {
    if (!th.joinable()) return;
    {
      std::lock_guard<std::mutex> lk(mu);
      done = true;
    }
    cv.notify_all();
    th.join();
  }
};

const ms_param* find_param(const ms_kernel* k, int role, int index) {
  for (int i = 0; i < k->nparams; ++i)
    if (k->params[i].role == role && k->params[i].index == index) return &k->params[i];
  return nullptr;
}
int find_param_index(const ms_kernel* k, int role, int index) {
  for (int i = 0; i < k->nparams; ++i)
    if (k->params[i].role == role && k->params[i].index == index) return i;
  return -1;
}

std::string validate(const ms_kernel* k, const ms_dispatch* d) {
  const uint64_t threads = uint64_t(d->tpg.x) * d->tpg.y * d->tpg.z;
  if (!d->tpg.x || !d->tpg.y || !d->tpg.z || threads > 1024)
    return fmt("threads_per_threadgroup (%u, %u, %u) must be positive with at most 1024 threads",
               d->tpg.x, d->tpg.y, d->tpg.z);
  if (k->max_total_threads && threads > k->max_total_threads)
    return fmt(
        "threads_per_threadgroup has %llu threads, but kernel '%s' declares "
        "[[max_total_threads_per_threadgroup(%u)]]",
        (unsigned long long)threads, k->host_name, k->max_total_threads);
  if (!d->groups.x || !d->groups.y || !d->groups.z)
    return "the grid must have at least one threadgroup";
  if (d->mode != MS_MODE_FIBER && d->mode != MS_MODE_THREAD) return "unknown mode";
  bool seen[METALSIM_MAX_BINDINGS] = {};
  for (int i = 0; i < d->nbuffers; ++i) {
    const ms_binding& b = d->buffers[i];
    if (b.index < 0 || b.index >= METALSIM_MAX_BINDINGS)
      return fmt("buffer index %d out of range", b.index);
    if (seen[b.index]) return fmt("buffer index %d bound twice", b.index);
    seen[b.index] = true;
    if (b.nbytes && !b.data) return fmt("buffer %d: null data", b.index);
    if (b.offset > b.nbytes)
      return fmt("buffer %d: offset %llu is past its %llu bytes", b.index,
                 (unsigned long long)b.offset, (unsigned long long)b.nbytes);
    if (!find_param(k, MS_ROLE_BUFFER, b.index))
      return fmt("buffer %d is bound, but kernel '%s' has no [[buffer(%d)]] parameter", b.index,
                 k->host_name, b.index);
  }
  for (int i = 0; i < k->nparams; ++i) {
    const ms_param& p = k->params[i];
    const ms_param_layout& l = k->layouts[i];
    const bool indirect = l.is_pointer || l.is_reference;
    if ((p.role == MS_ROLE_BUFFER || p.role == MS_ROLE_THREADGROUP) != indirect)
      return fmt("kernel '%s': parameter '%s' must be %s", k->host_name, p.name,
                 indirect ? "a built-in value (no pointer or reference)"
                          : "a pointer or a reference to be bound to a buffer");
    if (p.role != MS_ROLE_BUFFER) continue;
    if (!seen[p.index])
      return fmt("kernel '%s' needs [[buffer(%d)]] '%s', which is not bound", k->host_name, p.index,
                 p.name);
    for (int j = 0; j < d->nbuffers; ++j)
      if (d->buffers[j].index == p.index) {
        const ms_binding& b = d->buffers[j];
        if (l.is_reference && b.nbytes - b.offset < l.size)
          return fmt("[[buffer(%d)]] '%s' is a reference to %llu bytes, but only %llu are bound",
                     p.index, p.name, (unsigned long long)l.size,
                     (unsigned long long)(b.nbytes - b.offset));
        if (l.align && b.offset % l.align)
          return fmt(
              "[[buffer(%d)]] '%s': offset %llu is not a multiple of the %u-byte alignment "
              "of what it points to",
              p.index, p.name, (unsigned long long)b.offset, l.align);
      }
  }
  bool tg_seen[METALSIM_MAX_BINDINGS] = {};
  uint64_t tg_total = 0;
  for (int i = 0; i < d->nthreadgroup; ++i) {
    const ms_binding& b = d->threadgroup[i];
    if (b.index < 0 || b.index >= METALSIM_MAX_BINDINGS)
      return fmt("threadgroup memory index %d out of range", b.index);
    if (tg_seen[b.index]) return fmt("threadgroup memory index %d bound twice", b.index);
    tg_seen[b.index] = true;
    if (b.nbytes % 16)
      return fmt(
          "threadgroup memory [[threadgroup(%d)]]: %llu bytes is not a multiple of 16 (Metal "
          "requires it)",
          b.index, (unsigned long long)b.nbytes);
    tg_total += b.nbytes;
  }
  for (int i = 0; i < k->nparams; ++i) {
    const ms_param& p = k->params[i];
    if (p.role == MS_ROLE_THREADGROUP && !tg_seen[p.index])
      return fmt("kernel '%s' needs [[threadgroup(%d)]] '%s': give its size in threadgroup_memory",
                 k->host_name, p.index, p.name);
  }
  if (tg_total > METALSIM_TG_MEMORY_LIMIT)
    return fmt(
        "threadgroup memory: %llu bytes requested, more than the %d bytes (32 KiB) a "
        "threadgroup has",
        (unsigned long long)tg_total, METALSIM_TG_MEMORY_LIMIT);
  return "";
}

bool map_buffer(const ms_kernel* k, const ms_binding& b, Mapping& m) {
  const int pi = find_param_index(k, MS_ROLE_BUFFER, b.index);
  const ms_param_layout& lay = k->layouts[pi];
  const std::size_t page = page_size();
  const std::size_t align = lay.align ? lay.align : 1;
  const std::size_t tail = round_up(std::size_t(b.nbytes), align);
  const std::size_t data_span = round_up(tail, page);
  m.index = b.index;
  m.name = k->params[pi].name;
  m.binding = &b;
  m.map_bytes = data_span + 2 * page;
  void* p = mmap(nullptr, m.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  m.base = static_cast<unsigned char*>(p);
  m.data_pages = m.base + page;
  m.end_guard = m.data_pages + data_span;
  // The data ends where the guard page starts, so reading past the end faults at once. A buffer
  // bound at an offset (a view with negative strides) may read backwards from its pointer:
  // there the data starts right after the first guard page instead. The slack on the other
  // side holds 0xFF bytes (NaN).
  m.data = b.offset ? m.data_pages : m.end_guard - tail;
  m.nbytes = b.nbytes;
  std::memset(m.data_pages, 0xff, data_span);
  if (b.nbytes) std::memcpy(m.data, b.data, b.nbytes);
  mprotect(m.base, page, PROT_NONE);
  mprotect(m.end_guard, page, PROT_NONE);
  m.read_only = lay.is_const || (b.flags & MS_BIND_BYTES);
  if (m.read_only && data_span) mprotect(m.data_pages, data_span, PROT_READ);
  return true;
}

}  // namespace

std::string describe_fault(int sig, void* addr, int is_write) {
  const char* access = is_write == 1 ? "write" : is_write == 0 ? "read" : "access";
  unsigned char* a = static_cast<unsigned char*>(addr);
  if (sig == SIGFPE) return "arithmetic exception (integer division by zero?)";
  if (sig == SIGILL)
    return "illegal instruction (a function that should return a value fell off its end?)";
  if (sig == SIGUSR2) return "";
  const std::size_t page = page_size();
  if (active.maps) {
    for (const Mapping& m : *active.maps) {
      const char* what = m.binding->flags & MS_BIND_BYTES ? "set_bytes data" : "buffer";
      if (a >= m.end_guard && a < m.end_guard + page)
        return fmt(
            "out-of-bounds %s of [[buffer(%d)]] '%s' (%s of %zu bytes): byte %zu past its end",
            access, m.index, m.name, what, m.nbytes, std::size_t(a - (m.data + m.nbytes)));
      if (a >= m.base && a < m.data_pages)
        return fmt(
            "out-of-bounds %s of [[buffer(%d)]] '%s' (%s of %zu bytes): %zu bytes before "
            "its start",
            access, m.index, m.name, what, m.nbytes, std::size_t(m.data - a));
      if (a >= m.data_pages && a < m.end_guard && m.read_only)
        return fmt(
            "write to read-only [[buffer(%d)]] '%s' (declared `constant` or `device const`%s)",
            m.index, m.name, m.binding->flags & MS_BIND_BYTES ? ", bound as bytes" : "");
    }
  }
  if (active.group && a >= active.group->tg_arena + METALSIM_TG_MEMORY_LIMIT &&
      a < active.group->tg_arena + METALSIM_TG_MEMORY_LIMIT + page)
    return fmt("out-of-bounds %s of threadgroup memory: past the 32 KiB a threadgroup has", access);
  if (active.mode == MS_MODE_FIBER)
    for (char* lo : stack_pool.lo)
      if (a >= reinterpret_cast<unsigned char*>(lo) - page &&
          a < reinterpret_cast<unsigned char*>(lo))
        return fmt(
            "stack overflow: the thread used more than its %zu KiB of stack (set "
            "METALSIM_STACK_KIB to raise it; large private arrays?)",
            active.stack_bytes / 1024);
  if (a < reinterpret_cast<unsigned char*>(page))
    return fmt("%s through a null pointer (address %p)", access, addr);
  return fmt("invalid memory %s at address %p (not in any bound buffer)", access, addr);
}

void run_entry_guarded(Group& g, ThreadCtx* t) {
  Recovery& r = tls_recovery;
  std::unique_ptr<char[]> alt;
  stack_t old{};
  const std::size_t size = 64 * 1024;
  alt.reset(new char[size]);
  stack_t ss{};
  ss.ss_sp = alt.get();
  ss.ss_size = size;
  sigaltstack(&ss, &old);
  if (sigsetjmp(r.jb, 1) == 0) {
    r.armed = 1;
    try {
      g.kernel->entry(&t->args);
    } catch (const GroupFailed&) {
    }
    r.armed = 0;
  } else {
    SyncScope sync(g, nullptr);
    std::lock_guard<std::mutex> lk(g.mu);
    record_failure(g, describe_fault(r.sig, r.addr, r.is_write) + " by " + describe_thread(g, *t));
  }
  ss.ss_flags = SS_DISABLE;
  sigaltstack(&ss, nullptr);
}

}  // namespace metalsim::rt

using namespace metalsim::rt;

MS_EXPORT const char* metalsim_runtime_info() {
  return fiber_impl_name();
}

MS_EXPORT int metalsim_dispatch(const ms_kernel* k, const ms_dispatch* d, char* err,
                                size_t errlen) {
  auto fail = [&](const std::string& msg) {
    std::snprintf(err, errlen, "%s", msg.c_str());
    return 1;
  };
  if (!k || !d) return fail("null kernel or dispatch");
  std::string problem = validate(k, d);
  if (!problem.empty()) return fail(problem);

  static Group g;  // reused: its vectors keep their capacity between dispatches
  std::vector<Mapping> maps;
  maps.reserve(std::size_t(d->nbuffers));
  auto unmap_all = [&] {
    for (Mapping& m : maps)
      if (m.base) munmap(m.base, m.map_bytes);
  };
  for (int i = 0; i < d->nbuffers; ++i) {
    maps.emplace_back();
    if (!map_buffer(k, d->buffers[i], maps.back())) {
      unmap_all();
      return fail("out of memory mapping buffers");
    }
  }
  const std::size_t page = page_size();
  const std::size_t arena_bytes = round_up(METALSIM_TG_MEMORY_LIMIT, page);
  void* arena =
      mmap(nullptr, arena_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (arena == MAP_FAILED) {
    unmap_all();
    return fail("out of memory mapping threadgroup memory");
  }
  mprotect(static_cast<char*>(arena) + arena_bytes, page, PROT_NONE);

  g.kernel = k;
  g.desc = d;
  g.mode = d->mode;
  g.failed = false;
  g.error.clear();
  g.tg_arena = static_cast<unsigned char*>(arena);
  g.tg_static.clear();
  g.tg_fresh = true;
  std::memset(g.buffer_pointers, 0, sizeof g.buffer_pointers);
  std::memset(g.tg_pointers, 0, sizeof g.tg_pointers);
  for (const Mapping& m : maps) g.buffer_pointers[m.index] = m.data + m.binding->offset;
  uint64_t off = 0;
  for (int i = 0; i < d->nthreadgroup; ++i) {
    g.tg_pointers[d->threadgroup[i].index] = g.tg_arena + off;
    off += d->threadgroup[i].nbytes;
  }
  g.tg_dynamic = g.tg_used = off;
  const uint32_t max_threads = d->tpg.x * d->tpg.y * d->tpg.z;
  if (g.threads.size() < max_threads) g.threads.resize(max_threads);
  if (g.sgs.size() < 32) g.sgs.resize(32);
  if (g.ready.size() < max_threads) g.ready.resize(max_threads);
  const std::size_t stack_bytes =
      round_up(std::size_t(d->stack_kib ? d->stack_kib : 128) * 1024, page);
  std::vector<char*> stacks;
  if (d->mode == MS_MODE_FIBER) {
    try {
      stack_pool.ensure(max_threads, stack_bytes);
    } catch (const std::bad_alloc&) {
      munmap(arena, arena_bytes + page);
      unmap_all();
      return fail("out of memory for fiber stacks");
    }
  }

  active.maps = &maps;
  active.group = &g;
  active.stack_bytes = stack_bytes;
  active.mode = d->mode;
  {
    SignalScope signals;
    Recovery& r = tls_recovery;
    Watchdog watchdog(d->mode == MS_MODE_FIBER ? d->timeout_s : 0, pthread_self());
    for (uint32_t z = 0; z < d->groups.z && !g.failed; ++z)
      for (uint32_t y = 0; y < d->groups.y && !g.failed; ++y)
        for (uint32_t x = 0; x < d->groups.x && !g.failed; ++x) {
          group_begin(g, ms_uint3{x, y, z});
          if (d->mode == MS_MODE_THREAD) {
            run_group_threads(g, stack_bytes);
            continue;
          }
          if (sigsetjmp(r.jb, 1) == 0) {
            r.armed = 1;
            run_group_fibers(g, stack_pool.lo.data(), stack_bytes);
            r.armed = 0;
          } else {
            ThreadCtx* t = r.thread;
            tls_current = nullptr;
            if (r.sig == SIGUSR2)
              record_failure(g, fmt("kernel '%s' did not finish within %u s (an endless loop?); "
                                    "set METALSIM_TIMEOUT_S to allow longer",
                                    k->host_name, d->timeout_s));
            else
              record_failure(g, describe_fault(r.sig, r.addr, r.is_write) +
                                    (t ? " by " + describe_thread(g, *t) : std::string()));
          }
        }
    r.armed = 0;
  }
  active = Active{};

  std::string error = g.failed ? "kernel '" + std::string(k->host_name) + "': " + g.error : "";
  if (!g.failed) {
    for (Mapping& m : maps) {
      if (m.read_only || !m.nbytes) continue;
      if (m.binding->flags & MS_BIND_HOST_WRITEABLE) {
        std::memcpy(m.binding->data, m.data, m.nbytes);
      } else if (std::memcmp(m.binding->data, m.data, m.nbytes) != 0) {
        error =
            fmt("kernel '%s' wrote to [[buffer(%d)]] '%s', but the array bound to it is "
                "read-only",
                k->host_name, m.index, m.name);
      }
    }
  }
  munmap(arena, arena_bytes + page);
  unmap_all();
  return error.empty() ? 0 : fail(error);
}
