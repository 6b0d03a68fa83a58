// Fibers: the emulated threads of one threadgroup take turns on one OS thread, switching only
// where a GPU thread would wait (a barrier, a SIMD-group function). A hand-written context
// switch (x86-64, aarch64) saves only the callee-saved registers; elsewhere, or when built with
// METALSIM_UCONTEXT, ucontext does the same job several times slower.
#pragma once
#include <cstddef>

#if !defined(METALSIM_UCONTEXT) && !defined(__x86_64__) && !defined(__aarch64__)
#define METALSIM_UCONTEXT 1
#endif
#ifdef METALSIM_UCONTEXT
#ifndef _XOPEN_SOURCE
#define _XOPEN_SOURCE 700
#endif
#include <ucontext.h>
#endif

namespace metalsim::rt {

struct Fiber {
#ifdef METALSIM_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  // Prepare this fiber to run fn(arg) on the stack [lo, lo + size) at its next switch_to.
  // fn must never return: it switches away for the last time instead.
  void init(char* lo, std::size_t size, void (*fn)(void*), void* arg);
};

// Save the running context into `from` and resume `to`.
void switch_fiber(Fiber& from, Fiber& to);

const char* fiber_impl_name();

}  // namespace metalsim::rt
