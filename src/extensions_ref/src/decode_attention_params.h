// Week 2 Day 5: what the host tells the decode-attention kernel, in one
// struct that decode_attention.cpp fills and decode_attention.metal reads from
// [[buffer(5)]]. Both files include this header, so the layout cannot drift.
// Fixed-size fields only (int64 first, then 4-byte ones): the same bytes in
// C++ and in the Metal Shading Language.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
#endif

// Threads per threadgroup = 32 * DECODE_ATTENTION_SIMDGROUPS.
#define DECODE_ATTENTION_SIMDGROUPS 8
// A threadgroup serves one (sequence, KV head) and at most this many of the
// query heads that share the KV head; a larger group is split over several
// threadgroups ("slices").
#define DECODE_ATTENTION_MAX_HEADS 8

struct DecodeAttentionParams {
  int64_t q_strides[3];   // query [B, H_q, D], in elements
  int64_t k_strides[4];   // key [B, H_kv, S, D]
  int64_t v_strides[4];   // value [B, H_kv, S, D]
  int64_t lengths_stride; // lengths [B]
  int32_t num_heads;      // H_q
  int32_t num_kv_heads;   // H_kv
  int32_t max_len;        // S: lengths must lie in [0, S]
  int32_t slices; // threadgroups per KV head: ceil(group size / MAX_HEADS)
  float scale;    // multiplies q . k
  int32_t unused; // pads the struct to a multiple of 8 bytes
};
