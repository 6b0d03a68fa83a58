// Week 3 Day 9: what the host tells the quantized paged-attention kernel, in
// one struct that paged_attention_quantized.cpp fills and
// paged_attention_quantized.metal reads from [[buffer(10)]]. 4-byte fields
// only, so C++ and the Metal Shading Language agree on the bytes.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
#endif

// Threads per threadgroup = 32 * PAGED_ATTENTION_QUANTIZED_SIMDGROUPS.
#define PAGED_ATTENTION_QUANTIZED_SIMDGROUPS 4
// A threadgroup serves one (sequence, KV head) and at most this many of the
// query heads that share the KV head; a larger group is split into slices.
#define PAGED_ATTENTION_QUANTIZED_MAX_HEADS 8

struct PagedAttentionQuantizedParams {
  int32_t num_blocks;   // blocks in the pool: valid ids are [0, num_blocks)
  int32_t block_size;   // tokens per block
  int32_t max_blocks;   // columns of block_tables
  int32_t num_heads;    // H_q
  int32_t num_kv_heads; // H_kv
  int32_t slices;     // threadgroups per KV head: ceil(group size / MAX_HEADS)
  float scale;        // multiplies q . k
  int32_t group_size; // elements per (scale, bias) pair along the head dim
};
