#include "paged_attention_quantized.h"

#include <limits>
#include <stdexcept>
#include <string>
#include <typeinfo>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "paged_attention.h" // check_block_tables, fill_nan
#include "utils.h"

#ifdef _METAL_
#include "metal_encoder.h"
#endif

namespace tiny_llm {

namespace {

constexpr const char* kOp = "paged_attention_quantized";

// Inputs in the primitive's order, and their names for messages.
enum Input {
  kQuery,
  kKeyCodes,
  kKeyScales,
  kKeyBiases,
  kValueCodes,
  kValueScales,
  kValueBiases,
  kTables,
  kLens,
  kNumInputs
};
constexpr const char* kNames[kNumInputs] = {
    "query",
    "key_codes",
    "key_scales",
    "key_biases",
    "value_codes",
    "value_scales",
    "value_biases",
    "block_tables",
    "context_lens"};

// The array itself when computed and row-major (its values can be checked
// now), else a Contiguous node.
mx::array row_major(const mx::array& a, mx::Stream s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

bool readable_now(const mx::array& a) {
  return a.is_available() && a.flags().row_contiguous;
}

void expect(const mx::array& a, int i, mx::Dtype dtype, int ndim) {
  if (a.dtype() != dtype) {
    throw TypeError(
        std::string(kOp) + ": " + kNames[i] + " has dtype " +
        describe(a.dtype()) + "; expected " + describe(dtype));
  }
  if (static_cast<int>(a.ndim()) != ndim) {
    throw std::invalid_argument(
        std::string(kOp) + ": " + kNames[i] + " must have " +
        std::to_string(ndim) + " dimensions, got shape " + describe(a.shape()));
  }
}

void fail(const std::string& what) {
  throw std::invalid_argument(std::string(kOp) + ": " + what);
}

// Every shape and dtype check; returns nothing, throws on the first problem.
void check_arguments(const std::vector<mx::array>& in, int bits, int group) {
  const auto& q = in[kQuery];
  check_float(kOp, "query", q);
  if (q.ndim() != 3) {
    fail(
        "query must be [B, H_q, D] (one token per sequence), got shape " +
        describe(q.shape()));
  }
  for (int i : {kKeyCodes, kValueCodes}) {
    expect(in[i], i, mx::uint8, 4);
  }
  for (int i : {kKeyScales, kKeyBiases, kValueScales, kValueBiases}) {
    expect(in[i], i, mx::float16, 4);
  }
  expect(in[kTables], kTables, mx::int32, 2);
  expect(in[kLens], kLens, mx::int32, 1);
  if (bits != 4 && bits != 8) {
    fail("bits must be 4 or 8, got " + std::to_string(bits));
  }
  if (group != 32 && group != 64) {
    fail("group_size must be 32 or 64, got " + std::to_string(group));
  }
  const int head_dim = q.shape(2);
  if (head_dim != 64 && head_dim != 128) {
    fail(
        "head dim " + std::to_string(head_dim) +
        " has no kernel (64 or 128); use paged_attention_quantized_mlx");
  }
  const auto& codes = in[kKeyCodes];
  const mx::Shape want_codes{
      codes.shape(0), codes.shape(1), codes.shape(2), head_dim * bits / 8};
  const mx::Shape want_scales{
      codes.shape(0), codes.shape(1), codes.shape(2), head_dim / group};
  for (int i = kKeyCodes; i <= kValueBiases; ++i) {
    const bool is_codes = i == kKeyCodes || i == kValueCodes;
    const auto& want = is_codes ? want_codes : want_scales;
    if (in[i].shape() != want) {
      fail(
          std::string(kNames[i]) + " has shape " + describe(in[i].shape()) +
          "; a pool of " + std::to_string(bits) + "-bit rows of " +
          std::to_string(head_dim) + " elements in groups of " +
          std::to_string(group) + " needs " + describe(want));
    }
  }
  for (int i = 0; i < 3; ++i) {
    if (codes.shape(i) < 1) {
      fail("the pool is empty: key_codes " + describe(codes.shape()));
    }
  }
  if (int64_t(codes.shape(0)) * codes.shape(1) >
      std::numeric_limits<int32_t>::max()) {
    fail("more than 2^31 - 1 slots; int32 slots cannot name them");
  }
  const int batch = q.shape(0);
  const int num_heads = q.shape(1);
  const int num_kv_heads = codes.shape(2);
  if (num_heads < 1 || num_heads % num_kv_heads != 0) {
    fail(
        std::to_string(num_heads) + " query heads do not divide into " +
        std::to_string(num_kv_heads) +
        " KV heads (H_q must be a multiple of H_kv)");
  }
  if (in[kTables].shape(0) != batch || in[kLens].shape(0) != batch) {
    fail(
        std::to_string(batch) + " queries, but block_tables " +
        describe(in[kTables].shape()) + " and context_lens " +
        describe(in[kLens].shape()));
  }
  if (in[kTables].shape(1) < 1) {
    fail("block_tables " + describe(in[kTables].shape()) + " has no columns");
  }
}

} // namespace

mx::array paged_attention_quantized(
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
    int group_size,
    mx::StreamOrDevice s /* = {} */) {
  const std::vector<mx::array> given{
      query,
      key_codes,
      key_scales,
      key_biases,
      value_codes,
      value_scales,
      value_biases,
      block_tables,
      context_lens};
  check_arguments(given, bits, group_size);
  // Values already computed are checked now, at no cost in waiting.
  if (readable_now(block_tables) && readable_now(context_lens)) {
    auto error = check_block_tables(
        block_tables.data<int32_t>(),
        context_lens.data<int32_t>(),
        block_tables.shape(0),
        block_tables.shape(1),
        key_codes.shape(1),
        key_codes.shape(0));
    if (!error.empty()) {
      fail(error);
    }
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const auto& a : given) {
    inputs.push_back(row_major(a, stream));
  }
  return mx::array(
      query.shape(),
      query.dtype(),
      std::make_shared<PagedAttentionQuantized>(
          stream, scale, bits, group_size),
      std::move(inputs));
}

bool PagedAttentionQuantized::is_equivalent(const mx::Primitive& other) const {
  if (typeid(other) != typeid(*this)) {
    return false;
  }
  const auto& o = static_cast<const PagedAttentionQuantized&>(other);
  return o.scale_ == scale_ && o.bits_ == bits_ && o.group_size_ == group_size_;
}

void PagedAttentionQuantized::eval_cpu(
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
                    scale = scale_,
                    bits = bits_,
                    group_size = group_size_]() mutable {
    // As in paged_attention: the tables may have been computed just now, so
    // they are checked before any block id addresses the pool, and on any
    // error the output reads as NaN (the exception reaches Python only from
    // mx.eval of this very array).
    try {
      const auto& codes = inputs[kKeyCodes];
      const auto& tables = inputs[kTables];
      auto error = check_block_tables(
          tables.data<int32_t>(),
          inputs[kLens].data<int32_t>(),
          tables.shape(0),
          tables.shape(1),
          codes.shape(1),
          codes.shape(0));
      if (!error.empty()) {
        fail(error);
      }
      paged_attention_quantized_cpu(inputs, out, scale, bits, group_size);
    } catch (...) {
      fill_nan(out);
      throw;
    }
  });
}

// ---------------------------------------------------------------------------
// The Metal dispatch, written once against the Encoder interface.
//
// paged_attention_quantized_<dtype>_d<D>_b<bits>: buffers 0 query, 1-3 key
// codes/scales/biases, 4-6 value codes/scales/biases, 7 block_tables,
// 8 context_lens, 9 out, 10 PagedAttentionQuantizedParams. One threadgroup of
// 32 * SIMDGROUPS threads per (KV head, slice) along x and sequence along y.
// ---------------------------------------------------------------------------

namespace {

PagedAttentionQuantizedParams quantized_params(
    const std::vector<mx::array>& inputs, float scale, int group_size) {
  const auto& q = inputs[kQuery];
  const auto& codes = inputs[kKeyCodes];
  PagedAttentionQuantizedParams p{};
  p.num_blocks = codes.shape(0);
  p.block_size = codes.shape(1);
  p.max_blocks = inputs[kTables].shape(1);
  p.num_heads = q.shape(1);
  p.num_kv_heads = codes.shape(2);
  const int group = p.num_heads / p.num_kv_heads;
  p.slices = (group + PAGED_ATTENTION_QUANTIZED_MAX_HEADS - 1) /
             PAGED_ATTENTION_QUANTIZED_MAX_HEADS;
  p.scale = scale;
  p.group_size = group_size;
  return p;
}

} // namespace

void encode_paged_attention_quantized(
    Encoder& encoder,
    const std::vector<mx::array>& inputs,
    const PagedAttentionQuantizedParams& params,
    int bits) {
  const auto& q = inputs[kQuery];
  const size_t batch = q.shape(0);
  if (batch == 0) {
    return; // Metal rejects empty grids; there is nothing to compute.
  }
  encoder.set_kernel(
      "paged_attention_quantized_" + dtype_name(q.dtype()) + "_d" +
      std::to_string(q.shape(2)) + "_b" + std::to_string(bits));
  for (int i = 0; i < kNumInputs; ++i) {
    encoder.set_input(i, i);
  }
  encoder.set_output(0, kNumInputs);
  encoder.set_value(params, kNumInputs + 1);
  encoder.dispatch_threadgroups(
      {size_t(params.num_kv_heads) * params.slices, batch, 1},
      {32 * PAGED_ATTENTION_QUANTIZED_SIMDGROUPS, 1, 1});
}

void PagedAttentionQuantized::eval_gpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
#ifdef _METAL_
  // A GPU kernel cannot raise: a bad block id or length (values not known
  // when the op was built) makes that sequence's output NaN, and nothing
  // outside the pool is read.
  out.set_data(mx::allocator::malloc(out.nbytes()));
  std::vector<mx::array> outputs{out};
  MetalEncoder encoder(stream(), inputs, outputs);
  encode_paged_attention_quantized(
      encoder, inputs, quantized_params(inputs, scale_, group_size_), bits_);
#else
  (void)inputs;
  (void)out;
  throw std::runtime_error(
      "paged_attention_quantized: this MLX build has no Metal back-end; run "
      "it on the CPU stream");
#endif
}

std::vector<Command> plan_paged_attention_quantized(
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
  auto out = paged_attention_quantized(
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
      group_size,
      mx::Device(mx::Device::cpu));
  auto inputs = out.inputs();
  mx::eval(inputs);
  RecordingEncoder encoder(inputs, {out});
  encode_paged_attention_quantized(
      encoder, inputs, quantized_params(inputs, scale, group_size), bits);
  return encoder.commands();
}

} // namespace tiny_llm
