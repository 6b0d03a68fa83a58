// The runtime's state for one dispatch: the current threadgroup, its threads (fibers or OS
// threads), one rendezvous per SIMD-group and one per threadgroup barrier.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "fiber.h"
#include "metalsim/abi.h"

namespace metalsim::rt {

enum class State : uint8_t { Ready, Running, WaitSimd, WaitBarrier, Done };

struct Group;

struct ThreadCtx {
  Group* group = nullptr;
  uint32_t index = 0, sg = 0, lane = 0;
  State state = State::Ready;
  const char* wait_what = nullptr;  // what the thread waits in, for error messages
  site wait_where;
  ms_thread_args args{};
  Fiber fiber;
};

struct SimdState {
  uint32_t active = 0;      // lanes that have not returned
  uint32_t arrived = 0;     // lanes waiting in the open SIMD-group call
  uint32_t at_barrier = 0;  // lanes waiting at a threadgroup barrier
  uint64_t gen = 0;         // SIMD-group calls completed
  const char* what = nullptr;
  site where;
  uint32_t mask[2] = {0, 0};  // lanes that took part, per slot buffer
  // Double-buffered: a lane can only reach call g+2 (which reuses call g's buffer) once every
  // lane has arrived at call g+1, that is, once every lane has read the results of call g.
  alignas(64) unsigned char slots[2][METALSIM_SIMD_WIDTH][METALSIM_SLOT_BYTES];
  alignas(64) unsigned char shared[2][METALSIM_SIMD_WIDTH * METALSIM_SLOT_BYTES];
  uint8_t shared_valid[2] = {0, 0};
};

struct TgStatic {  // a `threadgroup` variable declared in a function body
  const char* file;
  uint32_t line, column;
  uint64_t offset, size;
};

// Thrown in thread mode to unwind a thread when its group has failed.
struct GroupFailed : std::exception {};

struct Group {
  const ms_kernel* kernel = nullptr;
  const ms_dispatch* desc = nullptr;
  int mode = MS_MODE_FIBER;
  ms_uint3 pos{}, size{};  // this threadgroup's position in the grid and its actual size
  uint32_t n = 0, nsg = 0;

  std::vector<ThreadCtx> threads;
  std::vector<SimdState> sgs;
  struct {
    uint32_t active = 0, arrived = 0;
    uint64_t gen = 0;
    const char* what = nullptr;
    site where;
  } bar;
  uint32_t alive = 0, blocked = 0;
  bool failed = false;
  std::string error;

  // Threadgroup memory: [[threadgroup(i)]] regions first, then function-body variables.
  unsigned char* tg_arena = nullptr;
  uint64_t tg_dynamic = 0, tg_used = 0;
  bool tg_fresh = true;  // no threadgroup has run yet in this dispatch
  std::vector<TgStatic> tg_static;
  void* tg_pointers[METALSIM_MAX_BINDINGS] = {};
  void* buffer_pointers[METALSIM_MAX_BINDINGS] = {};

  // Fiber mode: the dispatching OS thread's context and a FIFO of runnable fibers.
  Fiber scheduler;
  std::vector<uint32_t> ready;
  uint32_t ready_head = 0, ready_count = 0;

  // Thread mode: one condition variable per SIMD-group and one for the barrier, so that a
  // completed call wakes only the threads that wait for it.
  std::mutex mu;
  std::condition_variable sg_cv[METALSIM_SIMD_WIDTH];
  std::condition_variable bar_cv;
  void notify_all() {
    for (auto& cv : sg_cv) cv.notify_all();
    bar_cv.notify_all();
  }
};

// The emulated GPU thread running on this OS thread (fiber mode: the current fiber).
extern thread_local ThreadCtx* tls_current;

#ifdef METALSIM_TSAN
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

// Under ThreadSanitizer (thread mode of a METALSIM_SANITIZE=thread build) the runtime's own
// mutex must not order the kernel's memory accesses, or every race would look ordered: its
// locking is hidden from TSan, and only what the GPU guarantees is declared, a barrier orders
// the threads of the threadgroup and a SIMD-group call the lanes of the SIMD-group (sync_obj).
struct SyncScope {
#ifdef METALSIM_TSAN
  void* obj = nullptr;
  bool on = false;
  SyncScope(const Group& g, void* sync_obj) : obj(sync_obj), on(g.mode == MS_MODE_THREAD) {
    if (!on) return;
    if (obj) __tsan_release(obj);
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  }
  ~SyncScope() {
    if (!on) return;
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    if (obj) __tsan_acquire(obj);
  }
  // Publish what this thread wrote since the scope began (its value in a SIMD-group slot).
  void release_now() {
    if (!on || !obj) return;
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    __tsan_release(obj);
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  }
#else
  SyncScope(const Group&, void*) {}
  void release_now() {}
#endif
  SyncScope(const SyncScope&) = delete;
  SyncScope& operator=(const SyncScope&) = delete;
};

// group.cpp
std::string fmt(const char* format, ...) __attribute__((format(printf, 1, 2)));
void group_begin(Group& g, ms_uint3 pos);
void run_group_fibers(Group& g, char* const* stacks, std::size_t stack_bytes);
void run_group_threads(Group& g, std::size_t stack_bytes);
void record_failure(Group& g, const std::string& message);  // first failure wins
std::string describe_thread(const Group& g, const ThreadCtx& t);
std::string describe_site(const site& s);
std::string deadlock_message(const Group& g);

// dispatch.cpp: what a fault at `addr` hit, for the message (thread mode calls it too).
std::string describe_fault(int sig, void* addr, int is_write);
// Thread mode: each worker arms its own recovery point for faults.
void run_entry_guarded(Group& g, ThreadCtx* t);

}  // namespace metalsim::rt
