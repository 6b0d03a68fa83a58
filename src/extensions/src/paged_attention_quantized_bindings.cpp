// Week 3 Day 9: the Python functions of paged_attention_quantized.h,
// registered on the `_ext` module by bindings.cpp (which passes its
// plan-to-list converter).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "paged_attention_quantized.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tiny_llm {

void register_paged_attention_quantized(
    nb::module_& m, nb::list (*plan_to_list)(const std::vector<Command>&)) {
  m.def(
      "paged_attention_quantized",
      &paged_attention_quantized,
      "query"_a,
      "key_codes"_a,
      "key_scales"_a,
      "key_biases"_a,
      "value_codes"_a,
      "value_scales"_a,
      "value_biases"_a,
      "block_tables"_a,
      "context_lens"_a,
      "scale"_a,
      "bits"_a,
      "group_size"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Decode attention through block tables over a quantized pool (Week 3 "
      "Day 9). query [B, H_q, D]; *_codes [num_blocks, block_size, H_kv, D * "
      "bits / 8] uint8; *_scales / *_biases [num_blocks, block_size, H_kv, D "
      "/ group_size] float16; block_tables [B, max_blocks] int32; "
      "context_lens [B] int32. Returns [B, H_q, D].");

  m.def(
      "_plan_paged_attention_quantized",
      [plan_to_list](
          const mx::array& query,
          const mx::array& key_codes,
          const mx::array& key_scales,
          const mx::array& key_biases,
          const mx::array& value_codes,
          const mx::array& value_scales,
          const mx::array& value_biases,
          const mx::array& block_tables,
          const mx::array& context_lens,
          float scale,
          int bits,
          int group_size) {
        return plan_to_list(plan_paged_attention_quantized(
            query,
            key_codes,
            key_scales,
            key_biases,
            value_codes,
            value_scales,
            value_biases,
            block_tables,
            context_lens,
            scale,
            bits,
            group_size));
      },
      "query"_a,
      "key_codes"_a,
      "key_scales"_a,
      "key_biases"_a,
      "value_codes"_a,
      "value_scales"_a,
      "value_biases"_a,
      "block_tables"_a,
      "context_lens"_a,
      "scale"_a,
      "bits"_a,
      "group_size"_a,
      "The Metal commands eval_gpu would encode for "
      "paged_attention_quantized(...), for run_plan.");
}

} // namespace tiny_llm
