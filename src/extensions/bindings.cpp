// The Python module `_ext` (imported by the thin package beside it).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "errors.h"
#include "recording_encoder.h"
#include "swiglu.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

nb::tuple size3(const tiny_llm::Size3& s) {
  return nb::make_tuple(s.x, s.y, s.z);
}

// One recorded command as the dict tiny_llm_common.metal_dispatch.run_plan
// reads: buffers map a [[buffer(i)]] index to ("input", k), ("output", k) or
// ("bytes", b"..."); buffer_offsets give the byte offset of a bound array;
// input_memory holds each bound input's buffer (from its start), so run_plan
// can replay the plan without being given the inputs.
nb::dict command_to_dict(const tiny_llm::Command& c) {
  nb::dict buffers;
  nb::dict offsets;
  nb::dict memory;
  for (const auto& [index, b] : c.buffers) {
    using Kind = tiny_llm::Binding::Kind;
    if (b.kind == Kind::Bytes) {
      buffers[nb::int_(index)] = nb::make_tuple(
          "bytes",
          nb::bytes(
              reinterpret_cast<const char*>(b.bytes.data()), b.bytes.size()));
    } else {
      buffers[nb::int_(index)] =
          nb::make_tuple(b.kind == Kind::Input ? "input" : "output", b.array);
      if (b.offset != 0) {
        offsets[nb::int_(index)] = b.offset;
      }
      if (b.memory) {
        memory[nb::int_(b.array)] = nb::bytes(
            reinterpret_cast<const char*>(b.memory->data()), b.memory->size());
      }
    }
  }
  nb::dict tgmem;
  for (const auto& [index, nbytes] : c.threadgroup_memory) {
    tgmem[nb::int_(index)] = nbytes;
  }
  nb::dict d;
  d["kernel"] = c.kernel;
  d["kind"] = c.per_thread ? "threads" : "threadgroups";
  d["grid"] = size3(c.grid);
  d["threads_per_threadgroup"] = size3(c.group);
  d["buffers"] = buffers;
  d["buffer_offsets"] = offsets;
  d["threadgroup_memory"] = tgmem;
  d["input_memory"] = memory;
  return d;
}

nb::list plan_to_list(const std::vector<tiny_llm::Command>& commands) {
  nb::list out;
  for (const auto& c : commands) {
    out.append(command_to_dict(c));
  }
  return out;
}

} // namespace

namespace tiny_llm {
void register_decode_attention( // decode_attention_bindings.cpp
    nb::module_& m, nb::list (*plan_to_list)(const std::vector<Command>&));
void register_paged_attention( // paged_attention_bindings.cpp
    nb::module_& m, nb::list (*plan_to_list)(const std::vector<Command>&));
// paged_attention_quantized_bindings.cpp
void register_paged_attention_quantized(
    nb::module_& m, nb::list (*plan_to_list)(const std::vector<Command>&));
} // namespace tiny_llm

NB_MODULE(_ext, m) {
  m.doc() = "tiny-llm-paged's MLX C++/Metal extension";

  // Later translators are tried first; unmatched exceptions fall through to
  // nanobind's defaults (invalid_argument -> ValueError, ...).
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const tiny_llm::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const tiny_llm::NotImplemented& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    }
  });

  m.def(
      "swiglu",
      &tiny_llm::swiglu,
      "gate"_a,
      "up"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "silu(gate) * up elementwise (Week 2 Day 4). gate and up broadcast and "
      "must share a float dtype (float32, float16, bfloat16).");

  m.def(
      "_plan_swiglu",
      [](const mlx::core::array& gate, const mlx::core::array& up) {
        return plan_to_list(tiny_llm::plan_swiglu(gate, up));
      },
      "gate"_a,
      "up"_a,
      "The Metal commands eval_gpu would encode for swiglu(gate, up), as a "
      "list of dicts for tiny_llm_common.metal_dispatch.run_plan.");

  tiny_llm::register_decode_attention(m, plan_to_list);
  tiny_llm::register_paged_attention(m, plan_to_list);
  tiny_llm::register_paged_attention_quantized(m, plan_to_list);
}
