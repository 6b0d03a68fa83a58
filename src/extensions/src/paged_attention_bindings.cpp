// Week 3 Day 2: the Python functions of paged_attention.h, registered on the
// `_ext` module by bindings.cpp (which passes its plan-to-list converter, so
// the recorded plans come out exactly like _plan_swiglu's).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "paged_attention.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tiny_llm {

void register_paged_attention(
    nb::module_& m, nb::list (*plan_to_list)(const std::vector<Command>&)) {
  m.def(
      "paged_attention",
      &paged_attention,
      "query"_a,
      "key_cache"_a,
      "value_cache"_a,
      "block_tables"_a,
      "context_lens"_a,
      "scale"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Decode attention through block tables (Week 3 Day 2). query [B, H_q, "
      "D]; key_cache/value_cache [num_blocks, block_size, H_kv, D]; "
      "block_tables [B, max_blocks] int32 (padded with -1); context_lens [B] "
      "int32. Returns [B, H_q, D].");

  m.def(
      "reshape_and_cache",
      &reshape_and_cache,
      "key"_a,
      "value"_a,
      "key_cache"_a,
      "value_cache"_a,
      "slot_mapping"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Store key[t], value[t] ([T, H_kv, D]) at slot slot_mapping[t] "
      "(< 0: skip) of the caches; returns the new (key_cache, value_cache), "
      "which reuse the old buffers when nothing else holds them.");

  m.def(
      "_plan_paged_attention",
      [plan_to_list](
          const mx::array& query,
          const mx::array& key_cache,
          const mx::array& value_cache,
          const mx::array& block_tables,
          const mx::array& context_lens,
          float scale) {
        return plan_to_list(plan_paged_attention(
            query, key_cache, value_cache, block_tables, context_lens, scale));
      },
      "query"_a,
      "key_cache"_a,
      "value_cache"_a,
      "block_tables"_a,
      "context_lens"_a,
      "scale"_a,
      "The Metal commands eval_gpu would encode for paged_attention(...), "
      "for tiny_llm_common.metal_dispatch.run_plan.");

  m.def(
      "_plan_reshape_and_cache",
      [plan_to_list](
          const mx::array& key,
          const mx::array& value,
          const mx::array& key_cache,
          const mx::array& value_cache,
          const mx::array& slot_mapping) {
        return plan_to_list(plan_reshape_and_cache(
            key, value, key_cache, value_cache, slot_mapping));
      },
      "key"_a,
      "value"_a,
      "key_cache"_a,
      "value_cache"_a,
      "slot_mapping"_a,
      "The Metal commands eval_gpu would encode for reshape_and_cache(...) "
      "when the caches are not donated (copy, then write), for run_plan.");
}

} // namespace tiny_llm
