// Used by the code the driver generates after the kernel source: turns the runtime's
// ms_thread_args into the kernel's arguments and describes each parameter's C++ type, so the
// Python side can validate bindings (a `constant Params&` needs sizeof(Params) bytes, a
// `device const T*` buffer is read-only) before anything runs.
#pragma once
#pragma GCC system_header
#include <type_traits>
#include <utility>

#include "abi.h"
#include "vec.h"

namespace metalsim::glue {

template <class P>
constexpr ms_param_layout layout_of() {
  ms_param_layout l{};
  if constexpr (std::is_pointer_v<P>) {
    using E = std::remove_pointer_t<P>;
    l.is_pointer = 1;
    l.is_const = std::is_const_v<E>;
    if constexpr (std::is_void_v<E>) {
      l.size = 1;
      l.align = 1;
    } else {
      l.size = sizeof(E);
      l.align = alignof(E);
    }
  } else if constexpr (std::is_reference_v<P>) {
    using E = std::remove_reference_t<P>;
    l.is_reference = 1;
    l.is_const = std::is_const_v<E>;
    l.size = sizeof(E);
    l.align = alignof(E);
  } else {
    l.size = sizeof(P);
    l.align = alignof(P);
  }
  return l;
}

template <class... P>
const ms_param_layout* layouts(void (*)(P...)) {
  static const ms_param_layout table[sizeof...(P) + 1] = {layout_of<P>()..., ms_param_layout{}};
  return table;
}

// A built-in value (uint, ushort, uint2, ushort3, ...) from its three components.
template <class P>
P builtin(const ms_uint3& v) {
  using B = std::remove_cvref_t<P>;
  if constexpr (is_vec_v<B>) {
    using E = elem_t<B>;
    static_assert(width_v<B> <= 3, "metalsim: a built-in kernel argument has at most 3 components");
    if constexpr (width_v<B> == 2)
      return B(E(v.x), E(v.y));
    else
      return B(E(v.x), E(v.y), E(v.z));
  } else {
    static_assert(is_int_v<B>,
                  "metalsim: built-in kernel arguments are integers or integer vectors");
    return B(v.x);
  }
}

template <class P>
P arg(const ms_thread_args* t, const ms_param& p) {
  if constexpr (std::is_pointer_v<P>) {
    void* ptr = p.role == MS_ROLE_BUFFER ? t->buffers[p.index] : t->threadgroup[p.index];
    return static_cast<P>(ptr);
  } else if constexpr (std::is_reference_v<P>) {
    void* ptr = p.role == MS_ROLE_BUFFER ? t->buffers[p.index] : t->threadgroup[p.index];
    return *static_cast<std::remove_reference_t<P>*>(ptr);
  } else {
    return builtin<P>(t->builtin[p.role - MS_ROLE_BUILTIN0]);
  }
}

template <class... P, std::size_t... I>
void call(void (*f)(P...), const ms_thread_args* t, const ms_param* params,
          std::index_sequence<I...>) {
  f(arg<P>(t, params[I])...);
}
template <class... P>
void call(void (*f)(P...), const ms_thread_args* t, const ms_param* params) {
  call(f, t, params, std::index_sequence_for<P...>{});
}
template <class... P>
constexpr int arity(void (*)(P...)) {
  return int(sizeof...(P));
}

}  // namespace metalsim::glue
