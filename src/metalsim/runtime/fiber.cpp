#include "fiber.h"

#include <cstdint>

#ifdef __APPLE__
#define MS_SYM(name) "_" #name
#define MS_FUNC_BEGIN(name) \
  ".globl _" #name "\n.private_extern _" #name "\n.p2align 4\n_" #name ":\n"
#define MS_FUNC_END(name) ""
#else
#define MS_SYM(name) #name
#define MS_FUNC_BEGIN(name) \
  ".globl " #name "\n.hidden " #name "\n.type " #name ", %function\n.p2align 4\n" #name ":\n"
#define MS_FUNC_END(name) ".size " #name ", .-" #name "\n"
#endif

namespace metalsim::rt {

#ifdef METALSIM_UCONTEXT

namespace {
// makecontext passes only ints: the argument travels as two 32-bit halves, the function (the
// same for every fiber of a dispatch) through a thread-local.
thread_local void (*start_fn)(void*);
void ucontext_start(unsigned lo, unsigned hi) {
  start_fn(reinterpret_cast<void*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
}  // namespace

void Fiber::init(char* lo, std::size_t size, void (*fn)(void*), void* arg) {
  getcontext(&uc);
  uc.uc_stack.ss_sp = lo;
  uc.uc_stack.ss_size = size;
  uc.uc_link = nullptr;
  start_fn = fn;
  uintptr_t a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&uc, reinterpret_cast<void (*)()>(ucontext_start), 2, unsigned(a & 0xffffffffu),
              unsigned(a >> 32));
}

void switch_fiber(Fiber& from, Fiber& to) {
  swapcontext(&from.uc, &to.uc);
}
const char* fiber_impl_name() {
  return "ucontext";
}

#elif defined(__x86_64__)

extern "C" void ms_fiber_switch(void** save_sp, void* new_sp);
extern "C" void ms_fiber_trampoline();

// System V: rbx, rbp, r12-r15 are callee-saved. The SSE/x87 control words are not switched:
// every fiber of a dispatch shares the dispatching thread's (kernels cannot change them).
__asm__(".text\n" MS_FUNC_BEGIN(ms_fiber_switch)
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n" MS_FUNC_END(ms_fiber_switch)
        MS_FUNC_BEGIN(ms_fiber_trampoline)
        "  movq %r12, %rdi\n"
        "  andq $-16, %rsp\n"
        "  callq *%r13\n"
        "  ud2\n" MS_FUNC_END(ms_fiber_trampoline));

void Fiber::init(char* lo, std::size_t size, void (*fn)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
  uint64_t* p = reinterpret_cast<uint64_t*>(top - 8);  // so rsp is 16-aligned after `ret`
  *p = reinterpret_cast<uint64_t>(&ms_fiber_trampoline);
  *--p = 0;                                // rbp
  *--p = 0;                                // rbx
  *--p = reinterpret_cast<uint64_t>(arg);  // r12
  *--p = reinterpret_cast<uint64_t>(fn);   // r13
  *--p = 0;                                // r14
  *--p = 0;                                // r15
  sp = p;
}

void switch_fiber(Fiber& from, Fiber& to) {
  ms_fiber_switch(&from.sp, to.sp);
}
const char* fiber_impl_name() {
  return "asm-x86_64";
}

#elif defined(__aarch64__)

extern "C" void ms_fiber_switch(void** save_sp, void* new_sp);
extern "C" void ms_fiber_trampoline();

// AAPCS64: x19-x28, fp, lr and d8-d15 are callee-saved, plus fpcr. Frame of 176 bytes.
__asm__(".text\n" MS_FUNC_BEGIN(ms_fiber_switch)
        "  sub sp, sp, #176\n"
        "  stp x19, x20, [sp, #0]\n"
        "  stp x21, x22, [sp, #16]\n"
        "  stp x23, x24, [sp, #32]\n"
        "  stp x25, x26, [sp, #48]\n"
        "  stp x27, x28, [sp, #64]\n"
        "  stp x29, x30, [sp, #80]\n"
        "  stp d8, d9, [sp, #96]\n"
        "  stp d10, d11, [sp, #112]\n"
        "  stp d12, d13, [sp, #128]\n"
        "  stp d14, d15, [sp, #144]\n"
        "  mrs x9, fpcr\n"
        "  str x9, [sp, #160]\n"
        "  mov x9, sp\n"
        "  str x9, [x0]\n"
        "  mov sp, x1\n"
        "  ldr x9, [sp, #160]\n"
        "  msr fpcr, x9\n"
        "  ldp x19, x20, [sp, #0]\n"
        "  ldp x21, x22, [sp, #16]\n"
        "  ldp x23, x24, [sp, #32]\n"
        "  ldp x25, x26, [sp, #48]\n"
        "  ldp x27, x28, [sp, #64]\n"
        "  ldp x29, x30, [sp, #80]\n"
        "  ldp d8, d9, [sp, #96]\n"
        "  ldp d10, d11, [sp, #112]\n"
        "  ldp d12, d13, [sp, #128]\n"
        "  ldp d14, d15, [sp, #144]\n"
        "  add sp, sp, #176\n"
        "  ret\n" MS_FUNC_END(ms_fiber_switch)
        MS_FUNC_BEGIN(ms_fiber_trampoline)
        "  mov x0, x19\n"
        "  blr x20\n"
        "  brk #0\n" MS_FUNC_END(ms_fiber_trampoline));

void Fiber::init(char* lo, std::size_t size, void (*fn)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
  uint64_t* f = reinterpret_cast<uint64_t*>(top - 176);
  for (int i = 0; i < 22; ++i) f[i] = 0;
  f[0] = reinterpret_cast<uint64_t>(arg);                    // x19
  f[1] = reinterpret_cast<uint64_t>(fn);                     // x20
  f[11] = reinterpret_cast<uint64_t>(&ms_fiber_trampoline);  // x30
  uint64_t fpcr;
  __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
  f[20] = fpcr;
  sp = f;
}

void switch_fiber(Fiber& from, Fiber& to) {
  ms_fiber_switch(&from.sp, to.sp);
}
const char* fiber_impl_name() {
  return "asm-aarch64";
}

#endif

}  // namespace metalsim::rt
