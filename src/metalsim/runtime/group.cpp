// The execution model of one threadgroup: SIMD-group rendezvous, barriers, threadgroup
// variables, and the two ways of running the threads (fibers on one OS thread, or one OS thread
// each for ThreadSanitizer). The same state machine serves both; in thread mode a mutex guards it.
#include <pthread.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "internal.h"

namespace metalsim::rt {

thread_local ThreadCtx* tls_current = nullptr;

namespace {

// No-op in fiber mode (one OS thread), a real lock in thread mode.
struct GroupLock {
  std::unique_lock<std::mutex> lk;
  explicit GroupLock(Group& g) : lk(g.mu, std::defer_lock) {
    if (g.mode == MS_MODE_THREAD) lk.lock();
  }
};

bool same_site(const site& a, const site& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

// "0-4, 6, 8-255" for a sorted list of indices.
std::string ranges(const std::vector<uint32_t>& v) {
  std::string out;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? fmt("%u", v[i]) : fmt("%u-%u", v[i], v[j]);
    i = j + 1;
  }
  return out;
}

std::vector<uint32_t> lanes_of(uint32_t mask) {
  std::vector<uint32_t> v;
  for (uint32_t l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) v.push_back(l);
  return v;
}

std::vector<uint32_t> threads_waiting_at(const Group& g, State s, const site* where) {
  std::vector<uint32_t> v;
  for (uint32_t i = 0; i < g.n; ++i)
    if (g.threads[i].state == s && (!where || same_site(g.threads[i].wait_where, *where)))
      v.push_back(i);
  return v;
}

void push_ready(Group& g, ThreadCtx* t) {
  g.ready[(g.ready_head + g.ready_count) % g.n] = t->index;
  ++g.ready_count;
}
ThreadCtx* pop_ready(Group& g) {
  if (g.ready_count == 0) return nullptr;
  ThreadCtx* t = &g.threads[g.ready[g.ready_head]];
  g.ready_head = (g.ready_head + 1) % g.n;
  --g.ready_count;
  return t;
}

// Fiber mode: run the next runnable fiber, or go back to the scheduler when there is none.
void yield_fiber(Group& g, ThreadCtx* t) {
  ThreadCtx* next = pop_ready(g);
  if (next) {
    next->state = State::Running;
    tls_current = next;
    switch_fiber(t->fiber, next->fiber);
  } else {
    tls_current = nullptr;
    switch_fiber(t->fiber, g.scheduler);
  }
}

// Stop the calling thread after a failure: fibers never run again, OS threads unwind.
[[noreturn]] void abort_thread(Group& g, ThreadCtx* t) {
  if (g.mode == MS_MODE_FIBER) {
    tls_current = nullptr;
    switch_fiber(t->fiber, g.scheduler);
    __builtin_trap();  // a failed group is never resumed
  }
  throw GroupFailed();
}

[[noreturn]] void fail_here(Group& g, ThreadCtx* t, const std::string& message) {
  record_failure(g, message);
  abort_thread(g, t);
}

void wake(Group& g, ThreadCtx* t) {
  --g.blocked;
  if (g.mode == MS_MODE_FIBER) {
    t->state = State::Ready;
    push_ready(g, t);
  } else {
    t->state = State::Running;
  }
}

void block(Group& g, ThreadCtx* t, GroupLock& lock, State s, const char* what, const site& where) {
  t->state = s;
  t->wait_what = what;
  t->wait_where = where;
  ++g.blocked;
  if (g.mode == MS_MODE_FIBER) {
    yield_fiber(g, t);  // back when woken; a failed group never comes back
    return;
  }
  if (g.blocked == g.alive) record_failure(g, deadlock_message(g));
  std::condition_variable& cv = s == State::WaitSimd ? g.sg_cv[t->sg] : g.bar_cv;
  cv.wait(lock.lk, [&] { return t->state == State::Running || g.failed; });
  if (g.failed) throw GroupFailed();
}

void complete_simd(Group& g, SimdState& s, uint32_t sg_index) {
  uint32_t waiting = s.arrived;
  s.mask[s.gen & 1] = s.active;
  s.shared_valid[s.gen & 1] = 0;
  ++s.gen;
  s.arrived = 0;
  for (uint32_t l = 0; l < 32; ++l) {
    if (!((waiting >> l) & 1u)) continue;
    ThreadCtx& t = g.threads[sg_index * 32 + l];
    if (t.state == State::WaitSimd) wake(g, &t);
  }
  if (g.mode == MS_MODE_THREAD) g.sg_cv[sg_index].notify_all();
}

void complete_barrier(Group& g) {
  ++g.bar.gen;
  g.bar.arrived = 0;
  for (uint32_t sg = 0; sg < g.nsg; ++sg) g.sgs[sg].at_barrier = 0;
  for (uint32_t i = 0; i < g.n; ++i)
    if (g.threads[i].state == State::WaitBarrier) wake(g, &g.threads[i]);
  if (g.mode == MS_MODE_THREAD) g.bar_cv.notify_all();
}

std::string peers_message(const Group& g, uint32_t sg, uint32_t mask, const char* verb) {
  return fmt("lanes %s of simdgroup %u %s", ranges(lanes_of(mask)).c_str(), sg, verb);
}

void thread_finished(ThreadCtx* t) {
  Group& g = *t->group;
  SyncScope sync(g, nullptr);
  GroupLock lock(g);
  t->state = State::Done;
  --g.alive;
  if (g.failed) return;
  SimdState& s = g.sgs[t->sg];
  s.active &= ~(1u << t->lane);
  --g.bar.active;
  // A lane that returns no longer takes part: what the others wait for may now be complete.
  if (s.arrived && s.arrived == s.active) complete_simd(g, s, t->sg);
  if (g.bar.arrived && g.bar.arrived == g.bar.active) complete_barrier(g);
  if (g.mode == MS_MODE_THREAD && g.alive > 0 && g.blocked == g.alive)
    record_failure(g, deadlock_message(g));
}

void fiber_main(void* p) {
  ThreadCtx* t = static_cast<ThreadCtx*>(p);
  Group& g = *t->group;
  g.kernel->entry(&t->args);
  thread_finished(t);
  yield_fiber(g, t);
  __builtin_trap();  // a finished fiber is never resumed
}

void* worker_main(void* p) {
  ThreadCtx* t = static_cast<ThreadCtx*>(p);
  tls_current = t;
  run_entry_guarded(*t->group, t);
  thread_finished(t);
  return nullptr;
}

}  // namespace

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string describe_site(const site& s) {
  return fmt("%s:%u", s.file_name(), s.line());
}

std::string describe_thread(const Group& g, const ThreadCtx& t) {
  const ms_uint3& p = t.args.builtin[MS_THREAD_POSITION_IN_GRID - MS_ROLE_BUILTIN0];
  return fmt(
      "thread (%u,%u,%u) of the grid (threadgroup (%u,%u,%u), thread %u in it: simdgroup "
      "%u, lane %u)",
      p.x, p.y, p.z, g.pos.x, g.pos.y, g.pos.z, t.index, t.sg, t.lane);
}

std::string deadlock_message(const Group& g) {
  std::string msg = fmt("deadlock in threadgroup (%u,%u,%u): ", g.pos.x, g.pos.y, g.pos.z);
  std::vector<bool> seen(g.n, false);
  bool first = true;
  for (uint32_t i = 0; i < g.n; ++i) {
    const ThreadCtx& t = g.threads[i];
    if (seen[i] || (t.state != State::WaitSimd && t.state != State::WaitBarrier)) continue;
    std::vector<uint32_t> same;
    for (uint32_t j = i; j < g.n; ++j) {
      const ThreadCtx& u = g.threads[j];
      if (!seen[j] && u.state == t.state && same_site(u.wait_where, t.wait_where)) {
        seen[j] = true;
        same.push_back(j);
      }
    }
    msg += fmt("%sthreads %s wait in %s at %s", first ? "" : "; ", ranges(same).c_str(),
               t.wait_what, describe_site(t.wait_where).c_str());
    first = false;
  }
  msg +=
      ". Every active lane of a SIMD-group must make the same SIMD-group call, and every thread "
      "of a threadgroup must reach the same threadgroup_barrier (or have returned).";
  return msg;
}

void record_failure(Group& g, const std::string& message) {
  if (!g.failed) {
    g.failed = true;
    g.error = message;
  }
  if (g.mode == MS_MODE_THREAD) g.notify_all();
}

exchange_view simd_exchange(const void* value, uint32_t size, const char* what, const site& where) {
  ThreadCtx* t = tls_current;
  Group& g = *t->group;
  SimdState& s = g.sgs[t->sg];
  SyncScope sync(g, &s);
  GroupLock lock(g);
  if (g.failed) abort_thread(g, t);
  const uint32_t bit = 1u << t->lane;
  if (s.arrived && !same_site(s.where, where))
    fail_here(
        g, t,
        fmt("divergent SIMD-group call: %s calls %s at %s, but %s. Every active lane of a "
            "SIMD-group must make the same SIMD-group call (metalsim needs uniform control "
            "flow around them).",
            describe_thread(g, *t).c_str(), what, describe_site(where).c_str(),
            peers_message(g, t->sg, s.arrived,
                          fmt("wait in %s at %s", s.what, describe_site(s.where).c_str()).c_str())
                .c_str()));
  if (s.at_barrier)
    fail_here(g, t,
              fmt("divergent control flow: %s calls %s at %s, but %s, so neither can complete.",
                  describe_thread(g, *t).c_str(), what, describe_site(where).c_str(),
                  peers_message(g, t->sg, s.at_barrier, "wait at a threadgroup_barrier").c_str()));
  if (s.arrived == 0) {
    s.what = what;
    s.where = where;
  }
  const uint32_t parity = uint32_t(s.gen & 1);
  if (size) std::memcpy(s.slots[parity][t->lane], value, size);
  sync.release_now();
  s.arrived |= bit;
  if (s.arrived == s.active)
    complete_simd(g, s, t->sg);
  else
    block(g, t, lock, State::WaitSimd, what, where);
  const bool fibers = g.mode == MS_MODE_FIBER;
  return exchange_view{&s.slots[parity][0][0], s.mask[parity], t->lane,
                       fibers ? s.shared[parity] : nullptr,
                       fibers ? &s.shared_valid[parity] : nullptr};
}

void simdgroup_barrier(const char* what, const site& where) {
  simd_exchange(nullptr, 0, what, where);
}

void threadgroup_barrier(const char* what, const site& where) {
  ThreadCtx* t = tls_current;
  Group& g = *t->group;
  SyncScope sync(g, &g.bar);
  GroupLock lock(g);
  if (g.failed) abort_thread(g, t);
  SimdState& s = g.sgs[t->sg];
  if (s.arrived)
    fail_here(
        g, t,
        fmt("divergent control flow: %s reached %s at %s, but %s, so neither can complete.",
            describe_thread(g, *t).c_str(), what, describe_site(where).c_str(),
            peers_message(g, t->sg, s.arrived,
                          fmt("wait in %s at %s", s.what, describe_site(s.where).c_str()).c_str())
                .c_str()));
  if (g.bar.arrived && !same_site(g.bar.where, where)) {
    std::vector<uint32_t> waiting = threads_waiting_at(g, State::WaitBarrier, nullptr);
    fail_here(g, t,
              fmt("divergent threadgroup_barrier: %s reached the barrier at %s, but threads %s "
                  "wait at the barrier at %s. Every thread of a threadgroup must reach the same "
                  "barrier (or have returned).",
                  describe_thread(g, *t).c_str(), describe_site(where).c_str(),
                  ranges(waiting).c_str(), describe_site(g.bar.where).c_str()));
  }
  if (g.bar.arrived == 0) {
    g.bar.what = what;
    g.bar.where = where;
  }
  ++g.bar.arrived;
  s.at_barrier |= 1u << t->lane;
  if (g.bar.arrived == g.bar.active)
    complete_barrier(g);
  else
    block(g, t, lock, State::WaitBarrier, what, where);
}

void* threadgroup_alloc(uint64_t size, uint64_t align, const char* name, const site& where) {
  ThreadCtx* t = tls_current;
  Group& g = *t->group;
  SyncScope sync(g, nullptr);
  GroupLock lock(g);
  for (const TgStatic& v : g.tg_static)
    if (v.line == where.line() && v.column == where.column() &&
        (v.file == where.file_name() || std::strcmp(v.file, where.file_name()) == 0))
      return g.tg_arena + v.offset;
  uint64_t offset = (g.tg_used + align - 1) / align * align;
  if (offset + size > METALSIM_TG_MEMORY_LIMIT)
    fail_here(g, t,
              fmt("threadgroup memory limit exceeded: `threadgroup` variable '%s' at %s needs %llu "
                  "bytes, but %llu of the %d bytes (32 KiB) of a threadgroup are already used "
                  "(%llu by [[threadgroup(i)]] arguments).",
                  name, describe_site(where).c_str(), (unsigned long long)size,
                  (unsigned long long)g.tg_used, METALSIM_TG_MEMORY_LIMIT,
                  (unsigned long long)g.tg_dynamic));
  g.tg_static.push_back(TgStatic{where.file_name(), where.line(), where.column(), offset, size});
  if (g.mode == MS_MODE_FIBER) std::memset(g.tg_arena + g.tg_used, 0xff, offset + size - g.tg_used);
  g.tg_used = offset + size;
  return g.tg_arena + offset;
}

void fail(const char* message, const site& where) {
  ThreadCtx* t = tls_current;
  Group& g = *t->group;
  GroupLock lock(g);
  fail_here(
      g, t,
      fmt("%s at %s (%s)", message, describe_site(where).c_str(), describe_thread(g, *t).c_str()));
}

void group_begin(Group& g, ms_uint3 pos) {
  const ms_dispatch& d = *g.desc;
  g.pos = pos;
  ms_uint3 sz = d.tpg;
  if (d.nonuniform) {  // dispatchThreads: the last group along an axis may be partial
    sz.x = std::min(d.tpg.x, d.grid_threads.x - pos.x * d.tpg.x);
    sz.y = std::min(d.tpg.y, d.grid_threads.y - pos.y * d.tpg.y);
    sz.z = std::min(d.tpg.z, d.grid_threads.z - pos.z * d.tpg.z);
  }
  g.size = sz;
  g.n = sz.x * sz.y * sz.z;
  g.nsg = (g.n + 31) / 32;
  for (uint32_t sg = 0; sg < g.nsg; ++sg) {
    SimdState& s = g.sgs[sg];
    uint32_t lanes = std::min<uint32_t>(32, g.n - sg * 32);
    s.active = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    s.arrived = s.at_barrier = 0;
    s.gen = 0;
  }
  g.bar.active = g.n;
  g.bar.arrived = 0;
  g.bar.gen = 0;
  g.alive = g.n;
  g.blocked = 0;
  g.ready_head = g.ready_count = 0;
  // A missing barrier reads NaN. In fiber mode, after the first threadgroup only the part in use
  // needs it (a variable first reached later is filled when allocated). In thread mode the fill
  // must happen before the threads start, or ThreadSanitizer would see it race with them.
  const bool whole = g.tg_fresh || g.mode == MS_MODE_THREAD;
  std::memset(g.tg_arena, 0xff, whole ? METALSIM_TG_MEMORY_LIMIT : g.tg_used);
  g.tg_fresh = false;
  const uint32_t quads = (g.n + 3) / 4;
  for (uint32_t i = 0; i < g.n; ++i) {
    ThreadCtx& t = g.threads[i];
    t.group = &g;
    t.index = i;
    t.sg = i / 32;
    t.lane = i % 32;
    t.state = State::Ready;
    t.wait_what = nullptr;
    t.args.buffers = g.buffer_pointers;
    t.args.threadgroup = g.tg_pointers;
    ms_uint3 p{i % sz.x, (i / sz.x) % sz.y, i / (sz.x * sz.y)};
    auto set = [&](int role, ms_uint3 v) { t.args.builtin[role - MS_ROLE_BUILTIN0] = v; };
    set(MS_THREAD_POSITION_IN_GRID,
        {pos.x * d.tpg.x + p.x, pos.y * d.tpg.y + p.y, pos.z * d.tpg.z + p.z});
    set(MS_THREAD_POSITION_IN_THREADGROUP, p);
    set(MS_THREADGROUP_POSITION_IN_GRID, pos);
    set(MS_THREADS_PER_THREADGROUP, sz);
    set(MS_THREADGROUPS_PER_GRID, d.groups);
    set(MS_THREAD_INDEX_IN_THREADGROUP, {i, 0, 0});
    set(MS_SIMDGROUP_INDEX_IN_THREADGROUP, {i / 32, 0, 0});
    set(MS_THREAD_INDEX_IN_SIMDGROUP, {i % 32, 0, 0});
    set(MS_SIMDGROUPS_PER_THREADGROUP, {g.nsg, 0, 0});
    set(MS_THREADS_PER_SIMDGROUP, {32, 0, 0});
    set(MS_GRID_SIZE, d.grid_threads);
    set(MS_DISPATCH_THREADS_PER_THREADGROUP, d.tpg);
    set(MS_QUADGROUP_INDEX_IN_THREADGROUP, {i / 4, 0, 0});
    set(MS_THREAD_INDEX_IN_QUADGROUP, {i % 4, 0, 0});
    set(MS_QUADGROUPS_PER_THREADGROUP, {quads, 0, 0});
    set(MS_GRID_ORIGIN, {0, 0, 0});
  }
}

void run_group_fibers(Group& g, char* const* stacks, std::size_t stack_bytes) {
  for (uint32_t i = 0; i < g.n; ++i) {
    g.threads[i].fiber.init(stacks[i], stack_bytes, fiber_main, &g.threads[i]);
    push_ready(g, &g.threads[i]);
  }
  ThreadCtx* first = pop_ready(g);
  first->state = State::Running;
  tls_current = first;
  switch_fiber(g.scheduler, first->fiber);
  // Back here when every fiber has finished, one failed, or all that are left wait.
  tls_current = nullptr;
  if (!g.failed && g.alive > 0) record_failure(g, deadlock_message(g));
}

void run_group_threads(Group& g, std::size_t stack_bytes) {
  std::vector<pthread_t> ids(g.n);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, stack_bytes);
  uint32_t started = 0;
  for (; started < g.n; ++started) {
    if (pthread_create(&ids[started], &attr, worker_main, &g.threads[started]) != 0) {
      GroupLock lock(g);
      record_failure(g, fmt("thread mode: could not start OS thread %u of %u", started, g.n));
      break;
    }
  }
  pthread_attr_destroy(&attr);
  for (uint32_t i = 0; i < started; ++i) pthread_join(ids[i], nullptr);
  // Threads that never started (failure above) are simply not run.
}

}  // namespace metalsim::rt
