// Week 3 Day 9: the CPU kernel of paged_attention_quantized.
//
// Day 2's CPU kernel with one change: a key or value row is not read as
// floats but decoded from its codes, scales and biases into a small float32
// buffer, once per row for all the query heads that read it. The rest is as
// on Day 2: a work item is (sequence, range of its blocks) for all heads, a
// block's scores get one online-softmax update, long contexts are split into
// partitions of about 256 tokens (so two cores have work even for one
// sequence) whose softmax states are merged at the end.
//
// A slot's H_kv heads lie side by side in all three arrays, so decoding a
// row is one pass over H_kv * D / group_size groups: contiguous codes, one
// scale and one bias each.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "paged_attention_quantized.h"
#include "utils.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TINY_LLM_QPA_X86 1
#else
#define TINY_LLM_QPA_X86 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The 8-wide vectors only cross always-inlined calls: no ABI to keep stable.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define TINY_LLM_QPA_INLINE \
  [[maybe_unused]] inline __attribute__((always_inline))

namespace tiny_llm {

namespace {

// ---------------------------------------------------------------------------
// 8-wide float vectors (GCC/Clang vector extensions): SSE2 at the baseline,
// AVX2 + FMA inside the function compiled for them (chosen at run time).
// ---------------------------------------------------------------------------

typedef float f32x8 __attribute__((vector_size(32)));

TINY_LLM_QPA_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

TINY_LLM_QPA_INLINE void store8(float* p, f32x8 v) {
  std::memcpy(p, &v, sizeof(v));
}

TINY_LLM_QPA_INLINE f32x8 splat8(float x) {
  return f32x8{x, x, x, x, x, x, x, x};
}

// q . k over D floats, two running sums.
template <int D>
TINY_LLM_QPA_INLINE float dot(const float* q, const float* k) {
  f32x8 s0 = splat8(0.0f);
  f32x8 s1 = splat8(0.0f);
  for (int i = 0; i < D; i += 16) {
    s0 += load8(q + i) * load8(k + i);
    s1 += load8(q + i + 8) * load8(k + i + 8);
  }
  const f32x8 s = s0 + s1;
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

// exp(x) for x <= 0, 8 at a time (one scalar std::exp per score would cost
// more than decoding the keys): x = n * ln2 + r with |r| <= ln2 / 2, a
// degree-6 polynomial for e^r (Cephes' expf coefficients), n added to the
// exponent bits. Below -86 (and for -inf) the answer is 0.
typedef int32_t i32x8 __attribute__((vector_size(32)));

TINY_LLM_QPA_INLINE f32x8 exp8(f32x8 x) {
  const f32x8 lo = splat8(-86.0f);
  const i32x8 tiny = x < lo;
  x = tiny ? lo : x;
  const f32x8 shifter = splat8(12582912.0f); // 1.5 * 2^23: rounds to integer
  f32x8 t = x * splat8(1.44269504088896341f) + shifter;
  const i32x8 n = (i32x8)t - (i32x8)shifter;
  t -= shifter;
  f32x8 r = x - t * splat8(0.693359375f) - t * splat8(-2.12194440e-4f);
  f32x8 y = splat8(1.9875691500e-4f);
  y = y * r + splat8(1.3981999507e-3f);
  y = y * r + splat8(8.3334519073e-3f);
  y = y * r + splat8(4.1665795894e-2f);
  y = y * r + splat8(1.6666665459e-1f);
  y = y * r + splat8(5.0000001201e-1f);
  y = y * r * r + r + splat8(1.0f);
  return (f32x8)(((i32x8)y + (n << 23)) & ~tiny);
}

// y += w * x over D floats.
template <int D>
TINY_LLM_QPA_INLINE void add_scaled(float* y, float w, const float* x) {
  const f32x8 wv = splat8(w);
  for (int i = 0; i < D; i += 8) {
    store8(y + i, load8(y + i) + wv * load8(x + i));
  }
}

// ---------------------------------------------------------------------------
// Decoding one slot's row: `groups` groups of `group_size` elements; group g
// has codes at codes + g * group_size * BITS / 8 and its own scale and bias.
// Element i = code_i * scale + bias, in float32. 4-bit codes: element 2i in
// the low nibble of byte i, element 2i + 1 in the high nibble.
// ---------------------------------------------------------------------------

template <int BITS>
TINY_LLM_QPA_INLINE void dequantize_row(
    const uint8_t* __restrict codes,
    const mx::float16_t* __restrict scales,
    const mx::float16_t* __restrict biases,
    int groups,
    int group_size,
    float* __restrict out) {
  // TODO(Week 3 Day 9, task 7): decode the row into out[0 .. groups *
  // group_size). Group g: its scale and bias as float (static_cast<float>),
  // its codes at codes + g * group_size * BITS / 8, its elements at
  // out + g * group_size; element = float(code) * scale + bias.
  // BITS == 8: one code per byte. BITS == 4: byte i holds element 2i in its
  // low nibble (byte & 0xF) and element 2i + 1 in its high nibble (byte >> 4).
  // (`if constexpr (BITS == 8)` picks the branch at compile time.)
  (void)codes;
  (void)scales;
  (void)biases;
  (void)groups;
  (void)group_size;
  (void)out;
  throw NotImplemented(
      "Week 3 Day 9, task 7: implement dequantize_row in "
      "src/extensions/src/paged_attention_quantized_cpu.cpp");
}

// ---------------------------------------------------------------------------
// The work item: one sequence and a range of its logical blocks, for all
// heads. Its result is each query head's softmax state over those tokens:
// running max m, running sum l = sum exp(s - m), acc = sum exp(s - m) * v.
// ---------------------------------------------------------------------------

struct Problem {
  const void* query;       // [B, H_q, D]
  const uint8_t* codes[2]; // keys, values: [num_blocks, block_size, row bytes]
  const mx::float16_t* scales[2]; // [num_blocks, block_size, groups]
  const mx::float16_t* biases[2];
  const int32_t* block_tables; // [B, max_blocks]
  const int32_t* context_lens; // [B]
  int num_heads;
  int num_kv_heads;
  int group; // H_q / H_kv
  int block_size;
  int max_blocks;
  int group_size;
  float scale;
};

struct Item {
  int seq;
  int first_block; // logical blocks [first_block, last_block)
  int last_block;
  float* m;   // [H_q]
  float* l;   // [H_q]
  float* acc; // [H_q, D]
};

template <typename T, int D, int BITS>
TINY_LLM_QPA_INLINE void attend_item(const Problem& p, const Item& it) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int H = p.num_heads;
  const int G = p.group;
  const int bs = p.block_size;
  const int groups = p.num_kv_heads * D / p.group_size; // per slot
  const int64_t code_bytes = int64_t(p.num_kv_heads) * D * BITS / 8;
  const int len = p.context_lens[it.seq];
  const int32_t* table = p.block_tables + int64_t(it.seq) * p.max_blocks;

  // The queries in float32, scaled once; one decoded row; a block's scores.
  std::vector<float> q(size_t(H) * D);
  std::vector<float> decoded(size_t(p.num_kv_heads) * D);
  const int stride = (bs + 7) / 8 * 8; // a head's scores, padded for exp8
  std::vector<float> scores(size_t(H) * stride);
  const T* q_src = static_cast<const T*>(p.query) + int64_t(it.seq) * H * D;
  for (int i = 0; i < H * D; ++i) {
    q[i] = static_cast<float>(q_src[i]) * p.scale;
  }
  std::fill(it.m, it.m + H, -kInf);
  std::fill(it.l, it.l + H, 0.0f);
  std::fill(it.acc, it.acc + size_t(H) * D, 0.0f);

  auto decode = [&](int kv, int64_t slot) {
    dequantize_row<BITS>(
        p.codes[kv] + slot * code_bytes,
        p.scales[kv] + slot * groups,
        p.biases[kv] + slot * groups,
        groups,
        p.group_size,
        decoded.data());
  };

  for (int j = it.first_block; j < it.last_block; ++j) {
    // Logical block j of this sequence is physical block table[j].
    const int64_t first_slot = int64_t(table[j]) * bs;
    const int n = std::min(bs, len - j * bs);
    // 1. every key of the block, decoded once, scored by every query head
    //    (query head h reads KV head h / G).
    for (int r = 0; r < n; ++r) {
      decode(0, first_slot + r);
      for (int h = 0; h < H; ++h) {
        scores[h * stride + r] = dot<D>(&q[h * D], &decoded[(h / G) * D]);
      }
    }
    // 2. online softmax: a new maximum rescales what was summed so far.
    for (int h = 0; h < H; ++h) {
      float* s = &scores[h * stride];
      float m_new = it.m[h];
      for (int r = 0; r < n; ++r) {
        m_new = std::max(m_new, s[r]);
      }
      for (int r = n; r < stride; ++r) {
        s[r] = -kInf; // padding: weighs exp(-inf) = 0
      }
      const float correction = std::exp(it.m[h] - m_new); // 0 at the start
      f32x8 total = splat8(0.0f);
      for (int r = 0; r < stride; r += 8) {
        const f32x8 e = exp8(load8(s + r) - splat8(m_new));
        store8(s + r, e);
        total += e;
      }
      it.l[h] = it.l[h] * correction +
                (((total[0] + total[4]) + (total[1] + total[5])) +
                 ((total[2] + total[6]) + (total[3] + total[7])));
      it.m[h] = m_new;
      if (correction != 1.0f) {
        for (int i = 0; i < D; ++i) {
          it.acc[h * D + i] *= correction;
        }
      }
    }
    // 3. every value of the block, decoded once, weighted into every head.
    for (int r = 0; r < n; ++r) {
      decode(1, first_slot + r);
      for (int h = 0; h < H; ++h) {
        add_scaled<D>(
            it.acc + h * D, scores[h * stride + r], &decoded[(h / G) * D]);
      }
    }
  }
}

template <typename T, int D, int BITS>
void attend_item_baseline(const Problem& p, const Item& it) {
  attend_item<T, D, BITS>(p, it);
}

#if TINY_LLM_QPA_X86
template <typename T, int D, int BITS>
__attribute__((target("avx2,fma"))) void attend_item_avx2(
    const Problem& p, const Item& it) {
  attend_item<T, D, BITS>(p, it);
}

bool cpu_has_avx2_fma() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// Runs fn(i) for i in [0, n) on `threads` threads (the caller is one); the
// first exception stops the rest and is rethrown once all have finished.
template <class Fn>
void parallel_for(int n, int threads, const Fn& fn) {
  std::atomic<int> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&]() {
    try {
      for (int i = next++; i < n && !failed; i = next++) {
        fn(i);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) {
        error = std::current_exception();
      }
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back(run);
  }
  run();
  for (auto& thread : pool) {
    thread.join();
  }
  if (error) {
    std::rethrow_exception(error);
  }
}

// TINY_LLM_NUM_THREADS (as for paged_attention), else the hardware's count.
int max_threads() {
  if (const char* env = std::getenv("TINY_LLM_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) {
      return n;
    }
  }
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

// Tokens per partition (whole blocks): one long sequence still feeds every
// core, and merging stays negligible.
constexpr int kPartitionTokens = 256;
// Bytes of codes, scales and biases one extra thread must have to read
// before starting it pays off.
constexpr int64_t kBytesPerThread = 256 * 1024;

template <typename T, int D, int BITS>
void run(const Problem& p, int batch, T* out) {
  using ItemFn = void (*)(const Problem&, const Item&);
  ItemFn item_fn = attend_item_baseline<T, D, BITS>;
#if TINY_LLM_QPA_X86
  if (cpu_has_avx2_fma()) {
    item_fn = attend_item_avx2<T, D, BITS>;
  }
#endif
  const int H = p.num_heads;
  const int blocks_per_part = std::max(1, kPartitionTokens / p.block_size);

  std::vector<Item> items;
  std::vector<int> first_item(batch + 1);
  int64_t tokens = 0;
  for (int b = 0; b < batch; ++b) {
    const int len = p.context_lens[b];
    const int blocks = (len + p.block_size - 1) / p.block_size;
    tokens += len;
    first_item[b] = int(items.size());
    for (int j = 0; j < blocks; j += blocks_per_part) {
      items.push_back(
          {b,
           j,
           std::min(blocks, j + blocks_per_part),
           nullptr,
           nullptr,
           nullptr});
    }
  }
  first_item[batch] = int(items.size());
  const size_t per_item = size_t(H) * (D + 2);
  std::vector<float> storage(per_item * items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].m = storage.data() + i * per_item;
    items[i].l = items[i].m + H;
    items[i].acc = items[i].m + 2 * H;
  }

  const int64_t slot_bytes =
      int64_t(p.num_kv_heads) *
      (D * BITS / 8 + 4 * (D / p.group_size)); // codes + scales + biases
  const int64_t bytes = 2 * tokens * slot_bytes;
  const int cores = max_threads();
  const int threads = int(std::max<int64_t>(
      1,
      std::min<int64_t>(
          {cores, int64_t(items.size()), bytes / kBytesPerThread})));
  parallel_for(
      int(items.size()), threads, [&](int i) { item_fn(p, items[i]); });

  // Merge each sequence's partitions: rescale every partition's state to the
  // largest max, add, divide by the total weight.
  std::vector<float> merged(D);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < H; ++h) {
      float m = -std::numeric_limits<float>::infinity();
      for (int i = first_item[b]; i < first_item[b + 1]; ++i) {
        m = std::max(m, items[i].m[h]);
      }
      float l = 0.0f;
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int i = first_item[b]; i < first_item[b + 1]; ++i) {
        const float w = std::exp(items[i].m[h] - m);
        l += items[i].l[h] * w;
        add_scaled<D>(merged.data(), w, items[i].acc + h * D);
      }
      T* o = out + (int64_t(b) * H + h) * D;
      for (int i = 0; i < D; ++i) {
        o[i] = static_cast<T>(merged[i] / l);
      }
    }
  }
}

template <typename T, int D>
void dispatch_bits(const Problem& p, int batch, int bits, T* out) {
  if (bits == 8) {
    return run<T, D, 8>(p, batch, out);
  }
  return run<T, D, 4>(p, batch, out);
}

template <typename T>
void dispatch_head_dim(
    const Problem& p, int batch, int head_dim, int bits, T* out) {
  if (head_dim == 64) {
    return dispatch_bits<T, 64>(p, batch, bits, out);
  }
  if (head_dim == 128) {
    return dispatch_bits<T, 128>(p, batch, bits, out);
  }
  throw std::invalid_argument(
      "paged_attention_quantized: head dim must be 64 or 128");
}

} // namespace

void paged_attention_quantized_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out,
    float scale,
    int bits,
    int group_size) {
  const auto& q = inputs[0];
  const auto& codes = inputs[1];
  Problem p{};
  p.query = q.data<void>();
  for (int kv = 0; kv < 2; ++kv) {
    p.codes[kv] = inputs[1 + 3 * kv].data<uint8_t>();
    p.scales[kv] = inputs[2 + 3 * kv].data<mx::float16_t>();
    p.biases[kv] = inputs[3 + 3 * kv].data<mx::float16_t>();
  }
  p.block_tables = inputs[7].data<int32_t>();
  p.context_lens = inputs[8].data<int32_t>();
  p.num_heads = q.shape(1);
  p.num_kv_heads = codes.shape(2);
  p.group = p.num_heads / p.num_kv_heads;
  p.block_size = codes.shape(1);
  p.max_blocks = inputs[7].shape(1);
  p.group_size = group_size;
  p.scale = scale;
  const int batch = q.shape(0);
  const int head_dim = q.shape(2);
  switch (q.dtype()) {
    case mx::float32:
      return dispatch_head_dim(p, batch, head_dim, bits, out.data<float>());
    case mx::float16:
      return dispatch_head_dim(
          p, batch, head_dim, bits, out.data<mx::float16_t>());
    case mx::bfloat16:
      return dispatch_head_dim(
          p, batch, head_dim, bits, out.data<mx::bfloat16_t>());
    default:
      throw std::invalid_argument(
          "paged_attention_quantized: unsupported dtype");
  }
}

} // namespace tiny_llm
