// Week 3 Day 2: what the host tells the paged-attention kernel, in one struct
// that paged_attention.cpp fills and paged_attention.metal reads from
// [[buffer(6)]]. Both include this header, so the layout cannot drift: 4-byte
// fields only, the same bytes in C++ and in the Metal Shading Language.
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
#endif

// Threads per threadgroup = 32 * PAGED_ATTENTION_SIMDGROUPS.
#define PAGED_ATTENTION_SIMDGROUPS 4
// A threadgroup serves one (sequence, KV head) and at most this many of the
// query heads that share the KV head; a larger group is split over several
// threadgroups ("slices").
#define PAGED_ATTENTION_MAX_HEADS 8

struct PagedAttentionParams {
  int32_t num_blocks;   // blocks in the pool: valid ids are [0, num_blocks)
  int32_t block_size;   // tokens per block
  int32_t max_blocks;   // columns of block_tables
  int32_t num_heads;    // H_q
  int32_t num_kv_heads; // H_kv
  int32_t slices; // threadgroups per KV head: ceil(group size / MAX_HEADS)
  float scale;    // multiplies q . k
  int32_t unused; // pads the struct to 32 bytes
};
