#include "decode_attention.h"

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <typeinfo>

#include "decode_attention_params.h"
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
// The op: checks shapes and dtypes, then adds one DecodeAttention node.
// ---------------------------------------------------------------------------

namespace {

constexpr const char* kOp = "decode_attention";

void check_decode_inputs(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    float scale) {
  check_float(kOp, "query", query);
  check_float(kOp, "key", key);
  check_float(kOp, "value", value);
  if (key.dtype() != query.dtype() || value.dtype() != query.dtype()) {
    throw TypeError(
        std::string(kOp) + ": query, key and value must share a dtype; got " +
        describe(query.dtype()) + ", " + describe(key.dtype()) + ", " +
        describe(value.dtype()));
  }
  if (lengths.dtype() != mx::int32) {
    throw TypeError(
        std::string(kOp) + ": lengths has dtype " + describe(lengths.dtype()) +
        "; expected int32 (use .astype(mx.int32))");
  }
  if (query.ndim() != 3) {
    throw std::invalid_argument(
        std::string(kOp) + ": query must be [B, H_q, D], got shape " +
        describe(query.shape()));
  }
  if (key.ndim() != 4 || key.shape() != value.shape()) {
    throw std::invalid_argument(
        std::string(kOp) +
        ": key and value must both be [B, H_kv, S, D], got key " +
        describe(key.shape()) + " and value " + describe(value.shape()));
  }
  if (lengths.ndim() != 1) {
    throw std::invalid_argument(
        std::string(kOp) + ": lengths must be [B], got shape " +
        describe(lengths.shape()));
  }
  int batch = query.shape(0);
  if (key.shape(0) != batch || lengths.shape(0) != batch) {
    throw std::invalid_argument(
        std::string(kOp) + ": batch sizes differ: query " +
        describe(query.shape()) + ", key " + describe(key.shape()) +
        ", lengths " + describe(lengths.shape()));
  }
  int dim = query.shape(2);
  if (key.shape(3) != dim) {
    throw std::invalid_argument(
        std::string(kOp) + ": query has head dim " + std::to_string(dim) +
        " but key has " + std::to_string(key.shape(3)));
  }
  if (dim != 64 && dim != 128) {
    throw std::invalid_argument(
        std::string(kOp) + ": head dim " + std::to_string(dim) +
        " is not supported (the kernels are built for 64 and 128)");
  }
  int heads = query.shape(1);
  int kv_heads = key.shape(1);
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0) {
    throw std::invalid_argument(
        std::string(kOp) + ": " + std::to_string(heads) +
        " query heads are not a positive multiple of " +
        std::to_string(kv_heads) + " KV heads");
  }
  if (!std::isfinite(scale)) {
    throw std::invalid_argument(
        std::string(kOp) + ": scale must be finite, got " +
        std::to_string(scale));
  }
}

} // namespace

mx::array decode_attention(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    float scale,
    mx::StreamOrDevice s /* = {} */) {
  check_decode_inputs(query, key, value, lengths, scale);
  return mx::array(
      query.shape(),
      query.dtype(),
      std::make_shared<DecodeAttention>(mx::to_stream(s), scale),
      {query, key, value, lengths});
}

bool DecodeAttention::is_equivalent(const mx::Primitive& other) const {
  return typeid(other) == typeid(*this) &&
         static_cast<const DecodeAttention&>(other).scale_ == scale_;
}

// ---------------------------------------------------------------------------
// Provided: eval_cpu queues the CPU kernel (task 2, decode_attention_cpu.cpp)
// as Swiglu::eval_cpu does: allocate now, compute later, in a task that runs
// after the tasks producing the inputs.
// ---------------------------------------------------------------------------

void DecodeAttention::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
  }
  encoder.set_output_array(out);
  encoder.dispatch([query = mx::array::unsafe_weak_copy(inputs[0]),
                    key = mx::array::unsafe_weak_copy(inputs[1]),
                    value = mx::array::unsafe_weak_copy(inputs[2]),
                    lengths = mx::array::unsafe_weak_copy(inputs[3]),
                    out = mx::array::unsafe_weak_copy(out),
                    scale = scale_]() mutable {
    decode_attention_cpu(query, key, value, lengths, out, scale);
  });
}

// ---------------------------------------------------------------------------
// Week 2 Day 5, task 4: the Metal dispatch of decode_attention.metal.
// Buffers: 0 query, 1 key, 2 value, 3 lengths, 4 out, 5 DecodeAttentionParams
// (decode_attention_params.h). Grid: (H_kv * slices, B) threadgroups of
// 32 * DECODE_ATTENTION_SIMDGROUPS threads.
// ---------------------------------------------------------------------------

void encode_decode_attention(
    Encoder& encoder, const std::vector<mx::array>& inputs, float scale) {
  // TODO(Week 2 Day 5, task 4), against the Encoder interface (encoder.h):
  // - nothing to do for an empty batch (Metal rejects empty grids);
  // - fill a DecodeAttentionParams: the strides (in elements) of query, key,
  //   value and lengths, num_heads, num_kv_heads, max_len (S), slices
  //   (ceil(group size / DECODE_ATTENTION_MAX_HEADS)) and scale;
  // - select "decode_attention_<dtype>_d<D>" (dtype_name() in utils.h);
  // - bind inputs 0..3 and output 0 to buffers 0..4 (set_input, set_output)
  //   and the params to buffer 5 (set_value);
  // - dispatch_threadgroups: (H_kv * slices, B, 1) threadgroups of
  //   32 * DECODE_ATTENTION_SIMDGROUPS threads.
  (void)encoder;
  (void)inputs;
  (void)scale;
  throw NotImplemented(
      "Week 2 Day 5, task 4: implement encode_decode_attention in "
      "src/extensions/src/decode_attention.cpp");
}

// ---------------------------------------------------------------------------
// Provided: eval_gpu and the recorded plan both run encode_decode_attention.
// ---------------------------------------------------------------------------

void DecodeAttention::eval_gpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
#ifdef _METAL_
  out.set_data(mx::allocator::malloc(out.nbytes()));
  std::vector<mx::array> outputs{out};
  MetalEncoder encoder(stream(), inputs, outputs);
  encode_decode_attention(encoder, inputs, scale_);
#else
  (void)inputs;
  (void)out;
  throw std::runtime_error(
      "decode_attention: this MLX build has no Metal back-end; run it on the "
      "CPU stream");
#endif
}

std::vector<Command> plan_decode_attention(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    float scale) {
  auto out = decode_attention(
      query, key, value, lengths, scale, mx::Device(mx::Device::cpu));
  auto inputs = out.inputs();
  mx::eval(inputs);
  RecordingEncoder encoder(inputs, {out});
  encode_decode_attention(encoder, inputs, scale);
  return encoder.commands();
}

} // namespace tiny_llm
