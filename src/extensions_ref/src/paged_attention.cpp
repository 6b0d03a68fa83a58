#include "paged_attention.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <typeinfo>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "utils.h"

#ifdef _METAL_
#include "metal_encoder.h"
#endif

namespace tiny_llm {

// ---------------------------------------------------------------------------
// Value checks. Block ids and lengths live in arrays, so the op can only read
// them when they are already computed; the CPU task reads them again (cheap:
// B * max_blocks integers) before it touches the cache.
// ---------------------------------------------------------------------------

std::string check_block_tables(
    const int32_t* tables,
    const int32_t* lens,
    int batch,
    int max_blocks,
    int block_size,
    int num_blocks) {
  const int64_t capacity = int64_t(max_blocks) * block_size;
  for (int b = 0; b < batch; ++b) {
    const int64_t len = lens[b];
    if (len < 1 || len > capacity) {
      return "context_lens[" + std::to_string(b) +
             "] = " + std::to_string(len) + ": must be in [1, " +
             std::to_string(capacity) + "] (max_blocks * block_size)";
    }
    const int32_t* row = tables + int64_t(b) * max_blocks;
    const int64_t used = (len + block_size - 1) / block_size;
    for (int64_t j = 0; j < used; ++j) {
      if (row[j] < 0 || row[j] >= num_blocks) {
        return "block_tables[" + std::to_string(b) + ", " + std::to_string(j) +
               "] = " + std::to_string(row[j]) + " for " + std::to_string(len) +
               " tokens: block ids must be in [0, " +
               std::to_string(num_blocks) + ")";
      }
    }
  }
  return "";
}

std::string check_slot_mapping(
    const int32_t* slots, int64_t count, int64_t num_slots) {
  std::vector<int32_t> written;
  written.reserve(count);
  for (int64_t t = 0; t < count; ++t) {
    if (slots[t] >= num_slots) {
      return "slot_mapping[" + std::to_string(t) +
             "] = " + std::to_string(slots[t]) + " is outside the pool's " +
             std::to_string(num_slots) + " slots";
    }
    if (slots[t] >= 0) {
      written.push_back(slots[t]);
    }
  }
  std::sort(written.begin(), written.end());
  auto twice = std::adjacent_find(written.begin(), written.end());
  if (twice != written.end()) {
    return "slot_mapping writes slot " + std::to_string(*twice) + " twice";
  }
  return "";
}

namespace {

// The array itself when it is computed and row-major (so an evaluated array
// keeps its identity and its values can be checked now), else a Contiguous
// node, which copies only if the computed array turns out not to be.
mx::array row_major(const mx::array& a, mx::Stream s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

bool readable_now(const mx::array& a) {
  return a.is_available() && a.flags().row_contiguous;
}

void check_int32(const char* op, const char* arg, const mx::array& a) {
  if (a.dtype() != mx::int32) {
    throw TypeError(
        std::string(op) + ": " + arg + " has dtype " + describe(a.dtype()) +
        "; expected int32");
  }
}

void check_ndim(
    const char* op,
    const char* arg,
    const mx::array& a,
    int ndim,
    const char* what) {
  if (static_cast<int>(a.ndim()) != ndim) {
    throw std::invalid_argument(
        std::string(op) + ": " + arg + " must be " + what + ", got shape " +
        describe(a.shape()));
  }
}

void check_same_float(
    const char* op,
    const std::vector<std::pair<const char*, const mx::array*>>& args) {
  for (const auto& [name, a] : args) {
    check_float(op, name, *a);
  }
  const auto& [first_name, first] = args.front();
  for (const auto& [name, a] : args) {
    if (a->dtype() != first->dtype()) {
      throw TypeError(
          std::string(op) + ": " + name + " is " + describe(a->dtype()) +
          " but " + first_name + " is " + describe(first->dtype()) +
          "; they must match");
    }
  }
}

void check_pool(const char* op, const mx::array& kc, const mx::array& vc) {
  check_ndim(op, "key_cache", kc, 4, "[num_blocks, block_size, H_kv, D]");
  check_ndim(op, "value_cache", vc, 4, "[num_blocks, block_size, H_kv, D]");
  if (kc.shape() != vc.shape()) {
    throw std::invalid_argument(
        std::string(op) + ": key_cache " + describe(kc.shape()) +
        " and value_cache " + describe(vc.shape()) + " must have one shape");
  }
  for (int i = 0; i < 4; ++i) {
    if (kc.shape(i) < 1) {
      throw std::invalid_argument(
          std::string(op) + ": the caches are empty: " + describe(kc.shape()));
    }
  }
  if (int64_t(kc.shape(0)) * kc.shape(1) >
      std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument(
        std::string(op) +
        ": more than 2^31 - 1 slots; int32 slots cannot name them");
  }
}

} // namespace

// ---------------------------------------------------------------------------
// paged_attention: the op
// ---------------------------------------------------------------------------

mx::array paged_attention(
    const mx::array& query,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& block_tables,
    const mx::array& context_lens,
    float scale,
    mx::StreamOrDevice s /* = {} */) {
  constexpr const char* op = "paged_attention";
  check_same_float(
      op,
      {{"query", &query},
       {"key_cache", &key_cache},
       {"value_cache", &value_cache}});
  check_int32(op, "block_tables", block_tables);
  check_int32(op, "context_lens", context_lens);
  check_ndim(op, "query", query, 3, "[B, H_q, D] (one token per sequence)");
  check_pool(op, key_cache, value_cache);
  check_ndim(op, "block_tables", block_tables, 2, "[B, max_blocks]");
  check_ndim(op, "context_lens", context_lens, 1, "[B]");

  const int batch = query.shape(0);
  const int num_heads = query.shape(1);
  const int head_dim = query.shape(2);
  const int num_blocks = key_cache.shape(0);
  const int block_size = key_cache.shape(1);
  const int num_kv_heads = key_cache.shape(2);
  if (key_cache.shape(3) != head_dim) {
    throw std::invalid_argument(
        std::string(op) + ": query " + describe(query.shape()) +
        " has head dim " + std::to_string(head_dim) + " but the cache " +
        describe(key_cache.shape()) + " has " +
        std::to_string(key_cache.shape(3)));
  }
  if (head_dim != 64 && head_dim != 128) {
    throw std::invalid_argument(
        std::string(op) + ": head dim " + std::to_string(head_dim) +
        " has no kernel (64 or 128); use paged_attention_mlx");
  }
  if (num_heads < 1 || num_heads % num_kv_heads != 0) {
    throw std::invalid_argument(
        std::string(op) + ": " + std::to_string(num_heads) +
        " query heads do not divide into " + std::to_string(num_kv_heads) +
        " KV heads (H_q must be a multiple of H_kv)");
  }
  if (block_tables.shape(0) != batch || context_lens.shape(0) != batch) {
    throw std::invalid_argument(
        std::string(op) + ": " + std::to_string(batch) +
        " queries, but block_tables " + describe(block_tables.shape()) +
        " and context_lens " + describe(context_lens.shape()));
  }
  const int max_blocks = block_tables.shape(1);
  if (max_blocks < 1) {
    throw std::invalid_argument(
        std::string(op) + ": block_tables " + describe(block_tables.shape()) +
        " has no columns");
  }
  // Values already computed are checked now, at no cost in waiting.
  if (readable_now(block_tables) && readable_now(context_lens)) {
    auto error = check_block_tables(
        block_tables.data<int32_t>(),
        context_lens.data<int32_t>(),
        batch,
        max_blocks,
        block_size,
        num_blocks);
    if (!error.empty()) {
      throw std::invalid_argument(std::string(op) + ": " + error);
    }
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const auto* a :
       {&query, &key_cache, &value_cache, &block_tables, &context_lens}) {
    inputs.push_back(row_major(*a, stream));
  }
  return mx::array(
      query.shape(),
      query.dtype(),
      std::make_shared<PagedAttention>(stream, scale),
      std::move(inputs));
}

bool PagedAttention::is_equivalent(const mx::Primitive& other) const {
  return typeid(other) == typeid(*this) &&
         static_cast<const PagedAttention&>(other).scale_ == scale_;
}

void PagedAttention::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> weak;
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
    weak.push_back(mx::array::unsafe_weak_copy(a));
  }
  encoder.set_output_array(out);
  encoder.dispatch([inputs = std::move(weak),
                    out = mx::array::unsafe_weak_copy(out),
                    scale = scale_]() mutable {
    // The tables may have been computed just now: check them before any
    // block id is used to address the cache. MLX raises a task's exception
    // (as RuntimeError) only from mx.eval of this very array; whatever else
    // reads the output gets it as computed, so on any error it is NaN.
    try {
      const auto& kc = inputs[1];
      const auto& tables = inputs[3];
      auto error = check_block_tables(
          tables.data<int32_t>(),
          inputs[4].data<int32_t>(),
          tables.shape(0),
          tables.shape(1),
          kc.shape(1),
          kc.shape(0));
      if (!error.empty()) {
        throw std::invalid_argument("paged_attention: " + error);
      }
      paged_attention_cpu(inputs, out, scale);
    } catch (...) {
      fill_nan(out);
      throw;
    }
  });
}

// ---------------------------------------------------------------------------
// reshape_and_cache: the op
// ---------------------------------------------------------------------------

std::pair<mx::array, mx::array> reshape_and_cache(
    const mx::array& key,
    const mx::array& value,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& slot_mapping,
    mx::StreamOrDevice s /* = {} */) {
  constexpr const char* op = "reshape_and_cache";
  check_same_float(
      op,
      {{"key_cache", &key_cache},
       {"value_cache", &value_cache},
       {"key", &key},
       {"value", &value}});
  check_int32(op, "slot_mapping", slot_mapping);
  check_pool(op, key_cache, value_cache);
  const mx::Shape row{key_cache.shape(2), key_cache.shape(3)};
  for (const auto& [name, a] : {std::pair{"key", &key}, {"value", &value}}) {
    if (a->ndim() != 3 || mx::Shape{a->shape(1), a->shape(2)} != row) {
      throw std::invalid_argument(
          std::string(op) + ": " + name + " must be [T, " +
          std::to_string(row[0]) + ", " + std::to_string(row[1]) +
          "] to fit the cache, got shape " + describe(a->shape()));
    }
  }
  check_ndim(op, "slot_mapping", slot_mapping, 1, "[T]");
  if (value.shape(0) != key.shape(0) || slot_mapping.shape(0) != key.shape(0)) {
    throw std::invalid_argument(
        std::string(op) + ": key " + describe(key.shape()) + ", value " +
        describe(value.shape()) + " and slot_mapping " +
        describe(slot_mapping.shape()) + " must have one token count");
  }
  const int64_t num_slots = int64_t(key_cache.shape(0)) * key_cache.shape(1);
  if (readable_now(slot_mapping)) {
    auto error = check_slot_mapping(
        slot_mapping.data<int32_t>(), slot_mapping.size(), num_slots);
    if (!error.empty()) {
      throw std::invalid_argument(std::string(op) + ": " + error);
    }
  }
  auto stream = mx::to_stream(s);
  // One node per cache, so that each cache is referenced by one node only and
  // its buffer can be handed to the output. The caches go in as they are (not
  // through row_major): a Contiguous node in between would hold their buffers.
  auto slots = row_major(slot_mapping, stream);
  auto write = [&](const mx::array& rows, const mx::array& cache) {
    return mx::array(
        cache.shape(),
        cache.dtype(),
        std::make_shared<ReshapeAndCache>(stream),
        {row_major(rows, stream), cache, slots});
  };
  return {write(key, key_cache), write(value, value_cache)};
}

bool ReshapeAndCache::is_equivalent(const mx::Primitive& other) const {
  return typeid(other) == typeid(*this);
}

namespace {

// The output takes over the cache's buffer when nothing else references the
// cache (and it is laid out as the output will be); else it gets fresh memory
// that the kernel fills with a copy first. Returns whether to copy.
bool donate_or_allocate(const mx::array& cache, mx::array& out) {
  if (cache.is_donatable() && cache.flags().row_contiguous &&
      cache.data_size() == out.size()) {
    out.copy_shared_buffer(cache);
    return false;
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  return true;
}

} // namespace

void ReshapeAndCache::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  const bool copy = donate_or_allocate(inputs[1], out);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<mx::array> in;
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
    in.push_back(mx::array::unsafe_weak_copy(a));
  }
  encoder.set_output_array(out);
  encoder.dispatch([in = std::move(in),
                    out = mx::array::unsafe_weak_copy(out),
                    copy]() mutable {
    // Checked before anything is written, so on error the output is the
    // cache as it was (MLX raises the error only from mx.eval of this array;
    // what else reads the output must not get garbage).
    const auto& cache = in[1];
    auto error = check_slot_mapping(
        in[2].data<int32_t>(),
        in[2].size(),
        int64_t(cache.shape(0)) * cache.shape(1));
    if (!error.empty()) {
      if (copy) {
        copy_into(cache, out);
      }
      throw std::invalid_argument("reshape_and_cache: " + error);
    }
    reshape_and_cache_cpu(in, out, copy);
  });
}

// ---------------------------------------------------------------------------
// The Metal dispatch, written once against the Encoder interface.
//
// paged_attention_<dtype>_d<D>: buffers 0 query, 1 key_cache, 2 value_cache,
// 3 block_tables, 4 context_lens, 5 out, 6 PagedAttentionParams. One
// threadgroup of 32 * PAGED_ATTENTION_SIMDGROUPS threads per (KV head, slice)
// along x and sequence along y.
// ---------------------------------------------------------------------------

namespace {

PagedAttentionParams paged_params(
    const std::vector<mx::array>& inputs, float scale) {
  const auto& q = inputs[0];
  const auto& kc = inputs[1];
  PagedAttentionParams p{};
  p.num_blocks = kc.shape(0);
  p.block_size = kc.shape(1);
  p.max_blocks = inputs[3].shape(1);
  p.num_heads = q.shape(1);
  p.num_kv_heads = kc.shape(2);
  const int group = p.num_heads / p.num_kv_heads;
  p.slices =
      (group + PAGED_ATTENTION_MAX_HEADS - 1) / PAGED_ATTENTION_MAX_HEADS;
  p.scale = scale;
  return p;
}

} // namespace

void encode_paged_attention(
    Encoder& encoder,
    const std::vector<mx::array>& inputs,
    const PagedAttentionParams& params) {
  const auto& q = inputs[0];
  const size_t batch = q.shape(0);
  if (batch == 0) {
    return; // Metal rejects empty grids; there is nothing to compute.
  }
  encoder.set_kernel(
      "paged_attention_" + dtype_name(q.dtype()) + "_d" +
      std::to_string(q.shape(2)));
  for (int i = 0; i < 5; ++i) {
    encoder.set_input(i, i);
  }
  encoder.set_output(0, 5);
  encoder.set_value(params, 6);
  encoder.dispatch_threadgroups(
      {size_t(params.num_kv_heads) * params.slices, batch, 1},
      {32 * PAGED_ATTENTION_SIMDGROUPS, 1, 1});
}

// paged_cache_copy_<dtype>: 0 src, 1 dst, 2 n (uint), 3 shape (int[4]),
// 4 src strides (int64_t[4]) -- any layout in, row-major out.
// reshape_and_cache_<dtype>: 0 rows, 1 slot_mapping, 2 cache', 3 row = H_kv *
// D (int), 4 num_slots (int); one thread per (element of a row, token).
void encode_reshape_and_cache(
    Encoder& encoder, const std::vector<mx::array>& inputs, bool copy) {
  const auto& rows = inputs[0];
  const auto& cache = inputs[1];
  const std::string dtype = dtype_name(cache.dtype());
  if (copy) {
    const size_t n = cache.size();
    if (n > std::numeric_limits<uint32_t>::max()) {
      throw std::invalid_argument(
          "reshape_and_cache: a cache of more than 2^32 - 1 elements cannot "
          "be copied by one grid; let MLX donate it (rebind the caches)");
    }
    std::vector<int32_t> shape(cache.shape().begin(), cache.shape().end());
    std::vector<int64_t> strides(
        cache.strides().begin(), cache.strides().end());
    encoder.set_kernel("paged_cache_copy_" + dtype);
    encoder.set_input(1, 0);
    encoder.set_output(0, 1);
    encoder.set_value(static_cast<uint32_t>(n), 2);
    encoder.set_vector(shape, 3);
    encoder.set_vector(strides, 4);
    encoder.dispatch_threads({n, 1, 1}, {std::min<size_t>(n, 256), 1, 1});
  }
  const size_t tokens = rows.shape(0);
  const size_t row = size_t(rows.shape(1)) * rows.shape(2);
  if (tokens == 0) {
    return;
  }
  encoder.set_kernel("reshape_and_cache_" + dtype);
  encoder.set_input(0, 0);
  encoder.set_input(2, 1);
  encoder.set_output(0, 2);
  encoder.set_value(static_cast<int32_t>(row), 3);
  encoder.set_value(static_cast<int32_t>(cache.shape(0) * cache.shape(1)), 4);
  encoder.dispatch_threads(
      {row, tokens, 1}, {std::min<size_t>(row, 256), 1, 1});
}

// ---------------------------------------------------------------------------
// Provided: eval_gpu and the recorded plans run the encode functions above.
// ---------------------------------------------------------------------------

void PagedAttention::eval_gpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
#ifdef _METAL_
  // A GPU kernel cannot raise: with values not known when the op was built,
  // a bad block id or length makes that sequence's output NaN, and no memory
  // outside the pool is read.
  out.set_data(mx::allocator::malloc(out.nbytes()));
  std::vector<mx::array> outputs{out};
  MetalEncoder encoder(stream(), inputs, outputs);
  encode_paged_attention(encoder, inputs, paged_params(inputs, scale_));
#else
  (void)inputs;
  (void)out;
  throw std::runtime_error(
      "paged_attention: this MLX build has no Metal back-end; run it on the "
      "CPU stream");
#endif
}

void ReshapeAndCache::eval_gpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
#ifdef _METAL_
  // Slots outside the pool are skipped by the kernel (not checked: see
  // eval_gpu of PagedAttention); with duplicate slots one write wins.
  const bool copy = donate_or_allocate(inputs[1], out);
  std::vector<mx::array> outputs{out};
  MetalEncoder encoder(stream(), inputs, outputs);
  encode_reshape_and_cache(encoder, inputs, copy);
#else
  (void)inputs;
  (void)out;
  throw std::runtime_error(
      "reshape_and_cache: this MLX build has no Metal back-end; run it on "
      "the CPU stream");
#endif
}

std::vector<Command> plan_paged_attention(
    const mx::array& query,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& block_tables,
    const mx::array& context_lens,
    float scale) {
  auto out = paged_attention(
      query,
      key_cache,
      value_cache,
      block_tables,
      context_lens,
      scale,
      mx::Device(mx::Device::cpu));
  auto inputs = out.inputs();
  mx::eval(inputs);
  RecordingEncoder encoder(inputs, {out});
  encode_paged_attention(encoder, inputs, paged_params(inputs, scale));
  return encoder.commands();
}

std::vector<Command> plan_reshape_and_cache(
    const mx::array& key,
    const mx::array& value,
    const mx::array& key_cache,
    const mx::array& value_cache,
    const mx::array& slot_mapping) {
  auto [kc, vc] = reshape_and_cache(
      key,
      value,
      key_cache,
      value_cache,
      slot_mapping,
      mx::Device(mx::Device::cpu));
  // One plan for both nodes: the value cache's node writes output 1.
  std::vector<Command> commands;
  int output = 0;
  for (const auto& node : {kc, vc}) {
    auto inputs = node.inputs();
    mx::eval(inputs);
    RecordingEncoder encoder(inputs, {node});
    encode_reshape_and_cache(encoder, inputs, true);
    for (auto c : encoder.commands()) {
      for (auto& [index, binding] : c.buffers) {
        if (binding.kind == Binding::Kind::Output) {
          binding.array = output;
        }
      }
      commands.push_back(std::move(c));
    }
    ++output;
  }
  return commands;
}

} // namespace tiny_llm
