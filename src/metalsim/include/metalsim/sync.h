// Everything that makes the threads of a threadgroup meet: SIMD-group functions (through a
// rendezvous of the lanes, see runtime/group.cpp), barriers, threadgroup variables, atomics.
// Each call records its call site (std::source_location): the runtime checks that every active
// lane (thread) arrives at the same one, so divergent control flow becomes an error naming the
// .metal line.
#pragma once
#pragma GCC system_header
#include "abi.h"
#include "vec.h"

namespace metalsim::detail {

template <class T>
const T& slot(const rt::exchange_view& v, uint32_t lane) {
  return *reinterpret_cast<const T*>(v.slots + lane * METALSIM_SLOT_BYTES);
}
inline bool has(uint32_t mask, uint32_t lane) {
  return lane < 32 && (mask >> lane) & 1u;
}

template <class T>
rt::exchange_view exchange(const T& x, const char* what, const rt::site& s) {
  static_assert(sizeof(T) <= METALSIM_SLOT_BYTES,
                "metalsim: value too large for a SIMD-group function");
  return rt::simd_exchange(&x, sizeof(T), what, s);
}
// A value with every bit set: what a lane reads from an inactive lane (NaN for floats), so
// reading one shows up instead of quietly reusing stale data.
template <class T>
T poison() {
  T r;
  __builtin_memset(static_cast<void*>(&r), 0xff, sizeof(T));
  return r;
}
template <class T>
T from_lane(const rt::exchange_view& v, uint32_t src) {
  return has(v.mask, src) ? slot<T>(v, src) : poison<T>();
}
// All lanes of a call compute the same reduction: the first lane to get here computes it (a
// pairwise tree over the active lanes, as a GPU's butterfly would) and the others reuse it.
template <class T, class F>
T reduce(const rt::exchange_view& v, F f) {
  if (v.shared && *v.shared_valid) return *reinterpret_cast<const T*>(v.shared);
  T vals[32];
  int n = 0;
  for (uint32_t l = 0; l < 32; ++l)
    if (has(v.mask, l)) vals[n++] = slot<T>(v, l);
  while (n > 1) {
    int half_n = n / 2;
    for (int i = 0; i < half_n; ++i) vals[i] = T(f(vals[2 * i], vals[2 * i + 1]));
    if (n & 1) vals[half_n] = vals[n - 1];
    n = half_n + (n & 1);
  }
  if (v.shared) {
    __builtin_memcpy(static_cast<void*>(v.shared), static_cast<const void*>(&vals[0]), sizeof(T));
    *v.shared_valid = 1;
  }
  return vals[0];
}
// Prefix (scan) over the active lanes below the caller, computed once for all lanes.
template <class T, class F>
T prefix(const rt::exchange_view& v, F f, T identity, bool inclusive) {
  T* all = reinterpret_cast<T*>(v.shared);
  if (!(v.shared && *v.shared_valid)) {
    T local[32];
    T* out = v.shared ? all : local;
    T acc = identity;
    for (uint32_t l = 0; l < 32; ++l) {
      out[l] = acc;  // exclusive
      if (has(v.mask, l)) acc = T(f(acc, slot<T>(v, l)));
    }
    if (v.shared) {
      *v.shared_valid = 1;
    } else {
      T r = local[v.lane];
      return inclusive ? T(f(r, slot<T>(v, v.lane))) : r;
    }
  }
  return inclusive ? T(f(all[v.lane], slot<T>(v, v.lane))) : all[v.lane];
}
}  // namespace metalsim::detail

namespace metal {

#define MS_SITE const ::metalsim::rt::site& ms_site = ::metalsim::rt::site::current()
#define MS_REDUCE(name, expr)                                                             \
  template <class T>                                                                      \
  T name(T x, MS_SITE) {                                                                  \
    auto v = ::metalsim::detail::exchange(x, #name, ms_site);                             \
    return ::metalsim::detail::reduce<T>(v, [](const T& a, const T& b) { return expr; }); \
  }
MS_REDUCE(simd_sum, a + b)
MS_REDUCE(simd_product, a* b)
MS_REDUCE(simd_max, ::metal::max(a, b))
MS_REDUCE(simd_min, ::metal::min(a, b))
MS_REDUCE(simd_and, a& b)
MS_REDUCE(simd_or, a | b)
MS_REDUCE(simd_xor, a ^ b)
#undef MS_REDUCE

#define MS_PREFIX(name, expr, ident, inclusive)                            \
  template <class T>                                                       \
  T name(T x, MS_SITE) {                                                   \
    auto v = ::metalsim::detail::exchange(x, #name, ms_site);              \
    return ::metalsim::detail::prefix<T>(                                  \
        v, [](const T& a, const T& b) { return expr; }, ident, inclusive); \
  }
MS_PREFIX(simd_prefix_exclusive_sum, a + b, T(0), false)
MS_PREFIX(simd_prefix_inclusive_sum, a + b, T(0), true)
MS_PREFIX(simd_prefix_exclusive_product, a* b, T(1), false)
MS_PREFIX(simd_prefix_inclusive_product, a* b, T(1), true)
#undef MS_PREFIX

template <class T>
T simd_shuffle(T x, ushort lane, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_shuffle", ms_site);
  return ::metalsim::detail::from_lane<T>(v, lane);
}
template <class T>
T simd_broadcast(T x, ushort lane, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_broadcast", ms_site);
  return ::metalsim::detail::from_lane<T>(v, lane);
}
template <class T>
T simd_shuffle_xor(T x, ushort mask, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_shuffle_xor", ms_site);
  return ::metalsim::detail::from_lane<T>(v, (v.lane ^ mask) & 31u);
}
// Lanes whose source falls outside the SIMD-group keep their own value.
template <class T>
T simd_shuffle_down(T x, ushort delta, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_shuffle_down", ms_site);
  uint32_t src = v.lane + delta;
  return src < 32 ? ::metalsim::detail::from_lane<T>(v, src) : x;
}
template <class T>
T simd_shuffle_up(T x, ushort delta, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_shuffle_up", ms_site);
  return v.lane >= delta ? ::metalsim::detail::from_lane<T>(v, v.lane - delta) : x;
}
template <class T>
T simd_shuffle_rotate_down(T x, ushort delta, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_shuffle_rotate_down", ms_site);
  return ::metalsim::detail::from_lane<T>(v, (v.lane + delta) & 31u);
}
template <class T>
T simd_shuffle_rotate_up(T x, ushort delta, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_shuffle_rotate_up", ms_site);
  return ::metalsim::detail::from_lane<T>(v, (v.lane + 32u - (delta & 31u)) & 31u);
}
template <class T>
T simd_broadcast_first(T x, MS_SITE) {
  auto v = ::metalsim::detail::exchange(x, "simd_broadcast_first", ms_site);
  return ::metalsim::detail::slot<T>(v, uint32_t(__builtin_ctz(v.mask)));
}

struct simd_vote {
  typedef ulong vote_t;
  vote_t v;
  explicit operator vote_t() const {
    return v;
  }
  bool all() const {
    return v == 0xffffffffu;
  }
  bool any() const {
    return v != 0;
  }
};
inline simd_vote simd_ballot(bool b, MS_SITE) {
  auto v = ::metalsim::detail::exchange(b, "simd_ballot", ms_site);
  ulong r = 0;
  for (uint32_t l = 0; l < 32; ++l)
    if (::metalsim::detail::has(v.mask, l) && ::metalsim::detail::slot<bool>(v, l)) r |= 1ul << l;
  return simd_vote{r};
}
inline simd_vote simd_active_threads_mask(MS_SITE) {
  auto v = ::metalsim::detail::exchange(true, "simd_active_threads_mask", ms_site);
  return simd_vote{v.mask};
}
inline bool simd_all(bool b, MS_SITE) {
  auto v = ::metalsim::detail::exchange(b, "simd_all", ms_site);
  for (uint32_t l = 0; l < 32; ++l)
    if (::metalsim::detail::has(v.mask, l) && !::metalsim::detail::slot<bool>(v, l)) return false;
  return true;
}
inline bool simd_any(bool b, MS_SITE) {
  auto v = ::metalsim::detail::exchange(b, "simd_any", ms_site);
  for (uint32_t l = 0; l < 32; ++l)
    if (::metalsim::detail::has(v.mask, l) && ::metalsim::detail::slot<bool>(v, l)) return true;
  return false;
}
inline bool simd_is_first(MS_SITE) {
  auto v = ::metalsim::detail::exchange(true, "simd_is_first", ms_site);
  return v.lane == uint32_t(__builtin_ctz(v.mask));
}

// Barriers. The memory flags only matter on a GPU: here every barrier orders all memory.
enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(uint32_t(a) | uint32_t(b));
}
constexpr mem_flags operator&(mem_flags a, mem_flags b) {
  return mem_flags(uint32_t(a) & uint32_t(b));
}
inline void threadgroup_barrier(mem_flags, MS_SITE) {
  ::metalsim::rt::threadgroup_barrier("threadgroup_barrier", ms_site);
}
inline void simdgroup_barrier(mem_flags, MS_SITE) {
  ::metalsim::rt::simdgroup_barrier("simdgroup_barrier", ms_site);
}

enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst
};
enum class thread_scope {
  thread_scope_thread,
  thread_scope_simdgroup,
  thread_scope_threadgroup,
  thread_scope_device
};
inline void atomic_thread_fence(mem_flags, memory_order,
                                thread_scope = thread_scope::thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

// Atomics: a T in memory updated with the compiler's __atomic builtins (the thread mode runs
// lanes on OS threads, so they must be real atomics); float add is a compare-and-swap loop.
template <class T>
struct atomic {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "metalsim: atomic<T> needs a 32- or 64-bit T");
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;

namespace ms_atomic {
// The generic __atomic builtins (not the _n forms) also accept float.
template <class T>
T* raw(const volatile atomic<T>* a) {
  return const_cast<T*>(&a->value);
}
template <class T, class F>
T update(const volatile atomic<T>* a, F f) {
  T* p = raw(a);
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T desired = f(old);
  while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
    desired = f(old);
  return old;
}
}  // namespace ms_atomic

template <class T>
T atomic_load_explicit(const volatile atomic<T>* a, memory_order) {
  T r;
  __atomic_load(ms_atomic::raw(a), &r, __ATOMIC_SEQ_CST);
  return r;
}
template <class T, class U>
void atomic_store_explicit(volatile atomic<T>* a, U v, memory_order) {
  T t = T(v);
  __atomic_store(ms_atomic::raw(a), &t, __ATOMIC_SEQ_CST);
}
template <class T, class U>
T atomic_exchange_explicit(volatile atomic<T>* a, U v, memory_order) {
  T t = T(v), r;
  __atomic_exchange(ms_atomic::raw(a), &t, &r, __ATOMIC_SEQ_CST);
  return r;
}
template <class T, class U>
bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* a, T* expected, U desired,
                                           memory_order, memory_order) {
  T d = T(desired);
  return __atomic_compare_exchange(ms_atomic::raw(a), expected, &d, false, __ATOMIC_SEQ_CST,
                                   __ATOMIC_SEQ_CST);
}
#define MS_ATOMIC_RMW(name, expr)                                              \
  template <class T, class U>                                                  \
  T atomic_fetch_##name##_explicit(volatile atomic<T>* a, U v, memory_order) { \
    T operand = T(v);                                                          \
    return ms_atomic::update(a, [operand](T old) -> T { return T(expr); });    \
  }
MS_ATOMIC_RMW(add, old + operand)
MS_ATOMIC_RMW(sub, old - operand)
MS_ATOMIC_RMW(max, old > operand ? old : operand)
MS_ATOMIC_RMW(min, old < operand ? old : operand)
MS_ATOMIC_RMW(and, old& operand)
MS_ATOMIC_RMW(or, old | operand)
MS_ATOMIC_RMW(xor, old ^ operand)
#undef MS_ATOMIC_RMW
#undef MS_SITE

}  // namespace metal

namespace metalsim {
// `threadgroup T name[N];` in a kernel body is rewritten by the driver to
// `auto& name = ::metalsim::tg_var<T[N]>("name");`: one object per threadgroup, shared by its
// threads, as on the GPU (a plain local would be private to each thread).
template <class T>
T& tg_var(const char* name, const rt::site& s = rt::site::current()) {
  constexpr uint64_t align = alignof(T) > 16 ? alignof(T) : 16;
  return *static_cast<T*>(rt::threadgroup_alloc(sizeof(T), align, name, s));
}
}  // namespace metalsim
