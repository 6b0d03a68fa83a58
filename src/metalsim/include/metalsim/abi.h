// The interface between a compiled kernel library and the metalsim runtime (runtime/*.cpp).
// Plain C layout: Python reads the kernel table through ctypes (see metalsim/_abi.py, which must
// agree with this file; METALSIM_ABI_VERSION guards it).
#pragma once
#include <cstddef>
#include <cstdint>
#include <source_location>

#define METALSIM_ABI_VERSION 2
#define METALSIM_MAX_BINDINGS 31  // Metal's argument table: buffer and threadgroup indices 0..30
#define METALSIM_SIMD_WIDTH 32    // lanes per SIMD-group on Apple GPUs
#define METALSIM_SLOT_BYTES 64    // largest value a SIMD-group function may exchange
#define METALSIM_TG_MEMORY_LIMIT 32768  // threadgroup memory per threadgroup on Apple GPUs

extern "C" {

// What a kernel parameter is bound to; set by the Python parser from its [[attribute]].
enum ms_role : int32_t {
  MS_ROLE_BUFFER = 1,
  MS_ROLE_THREADGROUP = 2,
  // Built-in values: ms_thread_args::builtin[role - MS_ROLE_BUILTIN0].
  MS_ROLE_BUILTIN0 = 16,
  MS_THREAD_POSITION_IN_GRID = MS_ROLE_BUILTIN0,
  MS_THREAD_POSITION_IN_THREADGROUP,
  MS_THREADGROUP_POSITION_IN_GRID,
  MS_THREADS_PER_THREADGROUP,
  MS_THREADGROUPS_PER_GRID,
  MS_THREAD_INDEX_IN_THREADGROUP,
  MS_SIMDGROUP_INDEX_IN_THREADGROUP,
  MS_THREAD_INDEX_IN_SIMDGROUP,
  MS_SIMDGROUPS_PER_THREADGROUP,
  MS_THREADS_PER_SIMDGROUP,
  MS_GRID_SIZE,
  MS_DISPATCH_THREADS_PER_THREADGROUP,
  MS_QUADGROUP_INDEX_IN_THREADGROUP,
  MS_THREAD_INDEX_IN_QUADGROUP,
  MS_QUADGROUPS_PER_THREADGROUP,
  MS_GRID_ORIGIN,
  MS_ROLE_END
};
#define MS_NUM_BUILTINS (MS_ROLE_END - MS_ROLE_BUILTIN0)

struct ms_uint3 {
  uint32_t x, y, z;
};

struct ms_param {  // from the .metal source
  int32_t role;
  int32_t index;  // buffer/threadgroup index; 0 for built-ins
  const char* name;
  int32_t line;
};

struct ms_param_layout {  // from the C++ type of the parameter
  uint64_t size;          // sizeof the pointee (pointer/reference) or of the value
  uint32_t align;
  uint8_t is_pointer, is_reference, is_const, reserved;
};

// What one emulated GPU thread receives; the generated entry turns it into kernel arguments.
struct ms_thread_args {
  void* const* buffers;      // METALSIM_MAX_BINDINGS entries, by buffer index
  void* const* threadgroup;  // METALSIM_MAX_BINDINGS entries, by threadgroup index
  ms_uint3 builtin[MS_NUM_BUILTINS];
};

typedef void (*ms_entry_fn)(const ms_thread_args*);

struct ms_kernel {
  const char* host_name;
  const char* function;  // C++ expression naming the function, e.g. "attention<float, 64>"
  ms_entry_fn entry;
  int32_t nparams;
  const ms_param* params;
  const ms_param_layout* layouts;
  const char* file;
  int32_t line;
  uint32_t max_total_threads;  // [[max_total_threads_per_threadgroup(N)]], 0 if absent
};

struct ms_kernel_table {
  uint32_t abi_version;
  uint32_t count;
  const ms_kernel* kernels;
};

struct ms_binding {
  int32_t index;
  int32_t flags;  // MS_BIND_*
  void* data;     // host memory (NumPy array or bytes); copied in and, if written, out
  uint64_t nbytes;
  uint64_t offset;  // the kernel's pointer is data + offset (setBuffer:offset:)
};
enum { MS_BIND_HOST_WRITEABLE = 1, MS_BIND_BYTES = 2 };

enum { MS_MODE_FIBER = 0, MS_MODE_THREAD = 1 };

struct ms_dispatch {
  ms_uint3 groups;        // threadgroups per grid
  ms_uint3 tpg;           // threads per threadgroup (requested)
  ms_uint3 grid_threads;  // threads per grid (dispatchThreads); groups * tpg otherwise
  int32_t nonuniform;     // 1: dispatchThreads, edge groups are partial
  int32_t mode;           // MS_MODE_*
  int32_t nbuffers;
  const ms_binding* buffers;
  int32_t nthreadgroup;
  const ms_binding* threadgroup;  // only index and nbytes are used
  uint32_t stack_kib;             // per emulated thread
  uint32_t timeout_s;             // fiber mode: give up after this long (0: never)
};

}  // extern "C"

// Called by the shim headers from inside a running kernel.
namespace metalsim::rt {
using site = std::source_location;
struct exchange_view {
  const unsigned char* slots;  // METALSIM_SIMD_WIDTH slots of METALSIM_SLOT_BYTES
  uint32_t mask;               // lanes that took part (active lanes)
  uint32_t lane;               // the caller's lane
  // Fiber mode: room for a result every lane of this call shares (a reduction, the prefix
  // sums), computed by the first lane that reads it; null in thread mode.
  unsigned char* shared;  // METALSIM_SIMD_WIDTH * METALSIM_SLOT_BYTES bytes
  uint8_t* shared_valid;
};
exchange_view simd_exchange(const void* value, uint32_t size, const char* what, const site& where);
void threadgroup_barrier(const char* what, const site& where);
void simdgroup_barrier(const char* what, const site& where);
void* threadgroup_alloc(uint64_t size, uint64_t align, const char* name, const site& where);
[[noreturn]] void fail(const char* message, const site& where);
}  // namespace metalsim::rt
