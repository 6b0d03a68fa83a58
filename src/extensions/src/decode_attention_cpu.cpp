// Week 2 Day 5, task 2: the CPU kernel of decode_attention.
//
// The chapter (book/src/week2-05-decode-attention.md) walks through the
// reference's design: work units of one (sequence, KV head) and a range of
// keys, an online softmax per query head inside each unit, units merged at
// the end. Start with something simple and correct, then make it fast.

#include "decode_attention.h"
#include "errors.h"

namespace tiny_llm {

void decode_attention_cpu(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    mx::array& out,
    float scale) {
  // TODO(Week 2 Day 5, task 2): out[b, h] = softmax over t < lengths[b] of
  // scale * q[b, h] . key[b, kv, t], applied to value[b, kv, t], with
  // kv = h / (H_q / H_kv).
  // - inputs are evaluated; data<T>() points at each one's first element and
  //   strides() (in elements, possibly 0 or negative) say where the others
  //   are: query [B, H_q, D], key/value [B, H_kv, S, D], lengths [B] int32;
  //   out is a fresh row-contiguous [B, H_q, D] array;
  // - first check every length lies in [0, S] and throw std::out_of_range
  //   naming it ("decode_attention: lengths[1] is 301, outside [0, 300]")
  //   before reading any K/V; a sequence of length 0 gets zeros;
  // - float32, float16 (mx::float16_t) and bfloat16 (mx::bfloat16_t), with
  //   every sum in float32; D is 64 or 128.
  (void)query;
  (void)key;
  (void)value;
  (void)lengths;
  (void)out;
  (void)scale;
  throw NotImplemented(
      "Week 2 Day 5, task 2: implement decode_attention_cpu in "
      "src/extensions/src/decode_attention_cpu.cpp");
}

} // namespace tiny_llm
