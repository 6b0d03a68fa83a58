// Week 3 Day 2: PagedAttention (decode attention through block tables) and
// reshape_and_cache (writing new keys/values into their slots), as MLX
// primitives with a CPU kernel and a Metal kernel.
//
// Layouts (vLLM's, with the token axis before the head axis):
//   query        [B, H_q, D]                 one new token per sequence
//   key_cache    [num_blocks, block_size, H_kv, D]   (value_cache likewise)
//   block_tables [B, max_blocks] int32       physical block of each logical
//                                            block, padded with -1
//   context_lens [B] int32                   tokens stored per sequence
//   slot_mapping [T] int32                   where token t goes (block *
//                                            block_size + row; < 0: skip)
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "encoder.h"
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "paged_attention_params.h"
#include "recording_encoder.h"

namespace tiny_llm {

namespace mx = mlx::core;

// ---- the ops ---------------------------------------------------------------

// out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over the context_lens[b]
// tokens that block_tables[b] points at; query head h reads KV head
// h / (H_q / H_kv). Raises TypeError/ValueError for bad arguments before any
// node is built; block ids and lengths are checked here when those arrays are
// already evaluated, otherwise by the CPU task before it reads the cache.
mx::array paged_attention(
    const mx::array& query,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& block_tables,
    const mx::array& context_lens,
    float scale,
    mx::StreamOrDevice s = {});

// (key_cache', value_cache') with key[t] and value[t] ([T, H_kv, D]) stored at
// slot slot_mapping[t] (< 0: skipped). The outputs take over the caches'
// buffers when nothing else references them (MLX "donation"), so a caller that
// rebinds (`kc, vc = reshape_and_cache(k, v, kc, vc, slots)`) writes in place.
std::pair<mx::array, mx::array> reshape_and_cache(
    const mx::array& key,
    const mx::array& value,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& slot_mapping,
    mx::StreamOrDevice s = {});

// ---- value checks (shared by the op, the CPU tasks and the tests) ----------

// "" when every context_lens[b] is in [1, max_blocks * block_size] and every
// block it uses is in [0, num_blocks); else what is wrong, naming b.
std::string check_block_tables(
    const int32_t* tables,
    const int32_t* lens,
    int batch,
    int max_blocks,
    int block_size,
    int num_blocks);

// "" when every slot is < num_slots and no slot >= 0 appears twice.
std::string check_slot_mapping(
    const int32_t* slots, int64_t count, int64_t num_slots);

// ---- the CPU kernels (paged_attention_cpu.cpp) ------------------------------
// They run inside the task eval_cpu queues: inputs computed and row-major,
// values already checked, outputs allocated.

void paged_attention_cpu(
    const std::vector<mx::array>& inputs, mx::array& out, float scale);

// inputs: rows, cache, slot_mapping. copy: see encode_reshape_and_cache.
void reshape_and_cache_cpu(
    const std::vector<mx::array>& inputs, mx::array& out, bool copy);

// Provided helpers: `out` set to NaN (what an output reads as after an error)
// and `src` (any strides) copied into the row-major `dst`.
void fill_nan(mx::array& out);
void copy_into(const mx::array& src, mx::array& dst);

// ---- the Metal dispatch (written once; run by eval_gpu and recorded) -------

void encode_paged_attention(
    Encoder& encoder,
    const std::vector<mx::array>& inputs,
    const PagedAttentionParams& params);

// inputs: rows, cache, slot_mapping (one ReshapeAndCache node). copy: the
// output does not share the cache's buffer, so the old contents must be
// copied in before the new rows are written.
void encode_reshape_and_cache(
    Encoder& encoder, const std::vector<mx::array>& inputs, bool copy);

// The commands eval_gpu would encode (evaluates the inputs). The plan of
// reshape_and_cache holds the key cache's node, then the value cache's, and
// always copies the caches, since run_plan's outputs start empty.
std::vector<Command> plan_paged_attention(
    const mx::array& query,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& block_tables,
    const mx::array& context_lens,
    float scale);
std::vector<Command> plan_reshape_and_cache(
    const mx::array& key,
    const mx::array& value,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& slot_mapping);

// ---- the primitives ---------------------------------------------------------

// inputs: query, key_cache, value_cache, block_tables, context_lens.
class PagedAttention : public mx::UnaryPrimitive {
 public:
  PagedAttention(mx::Stream stream, float scale)
      : mx::UnaryPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "PagedAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  float scale() const {
    return scale_;
  }

 private:
  float scale_;
};

// Writes one cache: inputs rows [T, H_kv, D], cache, slot_mapping; output
// cache'. reshape_and_cache makes one node per cache, so each cache is the
// input of a single node and can be donated to its output.
class ReshapeAndCache : public mx::UnaryPrimitive {
 public:
  explicit ReshapeAndCache(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "ReshapeAndCache";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override {
    return {inputs[1].shape()};
  }
};

} // namespace tiny_llm
