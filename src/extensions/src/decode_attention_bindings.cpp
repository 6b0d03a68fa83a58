// Python bindings of the Week 2 Day 5 op, registered by bindings.cpp.
#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "decode_attention.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tiny_llm {

// `plan_to_list` is bindings.cpp's converter of recorded commands to the
// dicts tiny_llm_common.metal_dispatch.run_plan reads.
void register_decode_attention(
    nb::module_& m, nb::list (*plan_to_list)(const std::vector<Command>&)) {
  m.def(
      "decode_attention",
      &decode_attention,
      "query"_a,
      "key"_a,
      "value"_a,
      "lengths"_a,
      "scale"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Single-query attention (Week 2 Day 5): query [B, H_q, D] over "
      "key/value [B, H_kv, S, D], the first lengths[b] keys of sequence b "
      "(lengths [B] int32). D is 64 or 128; float32, float16 or bfloat16. "
      "Returns [B, H_q, D].");

  m.def(
      "_plan_decode_attention",
      [plan_to_list](
          const mx::array& query,
          const mx::array& key,
          const mx::array& value,
          const mx::array& lengths,
          float scale) {
        return plan_to_list(
            plan_decode_attention(query, key, value, lengths, scale));
      },
      "query"_a,
      "key"_a,
      "value"_a,
      "lengths"_a,
      "scale"_a,
      "The Metal commands eval_gpu would encode for decode_attention(...), "
      "as a list of dicts for tiny_llm_common.metal_dispatch.run_plan.");
}

} // namespace tiny_llm
