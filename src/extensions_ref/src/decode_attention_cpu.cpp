// Week 2 Day 5, task 2: the CPU kernel of decode_attention.
//
// Work is split into units of at most kChunk keys of one (sequence, KV head):
// every K/V row is read once for all the query heads of its group, and long
// sequences are shared among threads. Each unit keeps an online softmax per
// query head (running max m, running sum l, running weighted sum acc); the
// units of one (sequence, KV head) are merged at the end by the same rule
// that merges two halves of a softmax (flash-decoding).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "decode_attention.h"

// On x86-64 the kernel is compiled twice: for the baseline CPU (SSE2, what
// the wheel must run on) and for AVX2 + FMA + F16C, picked at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define TINY_LLM_X86_CLONES 1
#endif

namespace tiny_llm {

namespace {

constexpr int kChunk = 512; // keys per work unit
constexpr int kTile = 32;   // keys scored before one rescale of acc
constexpr float kLowest = std::numeric_limits<float>::lowest();

template <typename T>
struct Problem {
  const T* query;
  const T* key;
  const T* value;
  T* out;
  int64_t q_strides[3];
  int64_t k_strides[4];
  int64_t v_strides[4];
  int batch, heads, kv_heads, group, max_len;
  float scale;
  std::vector<int> lengths; // checked to lie in [0, max_len]
};

struct Unit {
  int b, kv_head, begin, end; // keys [begin, end) of sequence b
};

// Scratch space of one thread: the scaled queries of the group, a tile of
// scores per query head, and a tile of K or V rows converted to float.
struct Scratch {
  Scratch(int group, int dim)
      : queries(group * dim), scores(group * kTile), rows(kTile * dim) {}
  std::vector<float> queries, scores, rows;
};

// ---- 8-wide float vectors ---------------------------------------------------
// GCC/Clang vector extensions: portable source that becomes one AVX register
// (x86 with AVX2), two SSE or two NEON registers elsewhere.
// (GCC notes that passing such vectors by value differs with and without AVX;
// these helpers are internal and inlined, so no call crosses that boundary.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i32x8{__VA_ARGS__})
#endif

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v)); // unaligned load
  return v;
}

inline void store8(float* p, const f32x8& v) {
  std::memcpy(p, &v, sizeof(v));
}

inline f32x8 splat8(float x) {
  return f32x8{} + x; // vector + scalar: one broadcast instruction
}

// {sum(v[0]), ..., sum(v[7])}: eight horizontal sums in 7 adds, pairing
// neighbours three times, instead of reducing each vector on its own.
inline f32x8 sum8x8(const f32x8* v) {
  f32x8 t[4];
  for (int i = 0; i < 4; ++i) {
    const f32x8 a = v[2 * i];
    const f32x8 b = v[2 * i + 1];
    t[i] = SHUFFLE8(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
           SHUFFLE8(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  f32x8 u[2];
  for (int i = 0; i < 2; ++i) {
    const f32x8 a = t[2 * i];
    const f32x8 b = t[2 * i + 1];
    u[i] = SHUFFLE8(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
           SHUFFLE8(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return SHUFFLE8(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         SHUFFLE8(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// exp(x) for x <= 0 (scores minus their running maximum), eight at a time:
// round x / ln 2 to an integer n, approximate exp(r) on r = x - n ln 2 in
// [-ln2/2, ln2/2] by 1 + r + r^2 P(r), P of degree 5 (Cephes' expf, about
// 1 ulp), and build 2^n from its exponent bits. Below -87 the result would
// leave the normal floats: such a weight is 0.
inline f32x8 exp8_nonpositive(const f32x8& x_in) {
  const f32x8 lowest = splat8(-87.0f);
  const i32x8 tiny = x_in < lowest; // all ones where x < -87
  const f32x8 x = (f32x8)(((i32x8)x_in & ~tiny) | ((i32x8)lowest & tiny));
  // Adding 1.5 * 2^23 rounds to an integer, which lands in the low bits.
  const f32x8 t = x * splat8(1.44269504f) + splat8(12582912.0f);
  const f32x8 n = t - splat8(12582912.0f);
  const i32x8 pow2 = ((i32x8)t - 0x4B400000 + 127) << 23; // bits of 2^n
  const f32x8 r = (x - n * splat8(0.693359375f)) + n * splat8(2.12194440e-4f);
  f32x8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = (p * r * r + r) + splat8(1.0f);
  return (f32x8)((i32x8)(p * (f32x8)pow2) & ~tiny);
}

// The largest of s[0..N), eight lanes at a time.
template <int N>
inline float max_of(const float* s) {
  f32x8 m = load8(s);
  for (int i = 8; i < N; i += 8) {
    const f32x8 x = load8(s + i);
    const i32x8 bigger = x > m;
    m = (f32x8)(((i32x8)x & bigger) | ((i32x8)m & ~bigger));
  }
  return std::max(
      std::max(std::max(m[0], m[1]), std::max(m[2], m[3])),
      std::max(std::max(m[4], m[5]), std::max(m[6], m[7])));
}

// ---- rows of K, V and Q as float --------------------------------------------
// PlainRows is portable C++; F16cRows (x86 only) converts float16 with the
// F16C instructions, eight values at a time.
struct PlainRows {
  // D values of the row at src (elements `stride` apart) as floats: the row
  // itself when it already is contiguous float32, else converted into buf.
  template <typename T, int D>
  static const float* load(const T* src, int64_t stride, float* buf) {
    if constexpr (std::is_same_v<T, float>) {
      if (stride == 1) {
        return src;
      }
      for (int d = 0; d < D; ++d) {
        buf[d] = src[d * stride];
      }
    } else if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
      // A bfloat16 is the top half of a float32.
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
      for (int d = 0; d < D; ++d) {
        uint32_t u = uint32_t(bits[d * stride]) << 16;
        std::memcpy(&buf[d], &u, sizeof(float));
      }
    } else {
      for (int d = 0; d < D; ++d) {
        buf[d] = static_cast<float>(src[d * stride]);
      }
    }
    return buf;
  }
};

#ifdef TINY_LLM_X86_CLONES
struct F16cRows {
  template <typename T, int D>
  __attribute__((target("avx2,fma,f16c"))) static const float* load(
      const T* src, int64_t stride, float* buf) {
    if constexpr (std::is_same_v<T, mx::float16_t>) {
      if (stride == 1) {
        for (int d = 0; d < D; d += 8) {
          __m128i h =
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
          _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(h));
        }
        return buf;
      }
    }
    return PlainRows::load<T, D>(src, stride, buf);
  }
};
#endif

// ---- one work unit
// ------------------------------------------------------------

// Scores of keys k[0..7] against one query: eight dot products, the partial
// sums kept per key in a vector and added across at the end.
template <int D>
inline f32x8 scores8(const float* q, const float* const* k) {
  f32x8 acc[8];
  for (int i = 0; i < 8; ++i) {
    acc[i] = splat8(0.0f);
  }
  for (int d = 0; d < D; d += 8) {
    const f32x8 qd = load8(q + d);
    for (int i = 0; i < 8; ++i) {
      acc[i] += qd * load8(k[i] + d);
    }
  }
  return sum8x8(acc);
}

// acc[0..D) += sum over i < n of w[i] * v[i][0..D), 64 columns at a time so
// the running sums stay in registers while the n rows stream past.
template <int D>
inline void weighted_rows(
    float* acc, const float* w, const float* const* v, int n) {
  for (int d0 = 0; d0 < D; d0 += 64) {
    f32x8 a[8];
    for (int j = 0; j < 8; ++j) {
      a[j] = load8(acc + d0 + 8 * j);
    }
    for (int i = 0; i < n; ++i) {
      const f32x8 wi = splat8(w[i]);
      for (int j = 0; j < 8; ++j) {
        a[j] += wi * load8(v[i] + d0 + 8 * j);
      }
    }
    for (int j = 0; j < 8; ++j) {
      store8(acc + d0 + 8 * j, a[j]);
    }
  }
}

// Keys [unit.begin, unit.end) of one (sequence, KV head), for every query
// head of the group. `state` receives m[G], l[G], acc[G][D].
template <typename T, int D, class Rows>
void attend_unit(
    const Problem<T>& p, const Unit& unit, float* state, Scratch& scratch) {
  const int G = p.group;
  float* m = state;
  float* l = state + G;
  float* acc = state + 2 * G;
  float* q = scratch.queries.data();
  float* scores = scratch.scores.data();
  float* rows = scratch.rows.data();

  for (int g = 0; g < G; ++g) {
    const T* q_row = p.query + unit.b * p.q_strides[0] +
                     int64_t(unit.kv_head * G + g) * p.q_strides[1];
    const float* qf = Rows::template load<T, D>(q_row, p.q_strides[2], rows);
    for (int d = 0; d < D; ++d) {
      q[g * D + d] = qf[d] * p.scale;
    }
    m[g] = kLowest;
    l[g] = 0.0f;
    std::fill(acc + g * D, acc + (g + 1) * D, 0.0f);
  }

  const T* k_seq =
      p.key + unit.b * p.k_strides[0] + unit.kv_head * p.k_strides[1];
  const T* v_seq =
      p.value + unit.b * p.v_strides[0] + unit.kv_head * p.v_strides[1];
  const float* row[kTile]; // the tile's rows as float (maybe in `rows`)
  for (int t0 = unit.begin; t0 < unit.end; t0 += kTile) {
    const int n = std::min(kTile, unit.end - t0);
    // 1. Scores of this tile of keys, for every query head. A partial tile
    //    repeats its last key; those scores are dropped below.
    for (int i = 0; i < kTile; ++i) {
      const int t = t0 + std::min(i, n - 1);
      row[i] = Rows::template load<T, D>(
          k_seq + t * p.k_strides[2], p.k_strides[3], rows + i * D);
    }
    for (int g = 0; g < G; ++g) {
      for (int i = 0; i < kTile; i += 8) {
        store8(scores + g * kTile + i, scores8<D>(q + g * D, row + i));
      }
    }
    // 2. Online softmax: move each head's running sums to the new maximum
    //    (once per tile, not once per key), then turn scores into weights.
    for (int g = 0; g < G; ++g) {
      float* s = scores + g * kTile;
      std::fill(s + n, s + kTile, kLowest); // repeated keys: weight 0
      const float m_new = std::max(m[g], max_of<kTile>(s));
      const float correction = exp8_nonpositive(splat8(m[g] - m_new))[0];
      if (correction != 1.0f) {
        l[g] *= correction;
        for (int d = 0; d < D; ++d) {
          acc[g * D + d] *= correction;
        }
      }
      f32x8 sum = splat8(0.0f);
      for (int i = 0; i < kTile; i += 8) {
        const f32x8 w = exp8_nonpositive(load8(s + i) - splat8(m_new));
        store8(s + i, w);
        sum += w;
      }
      l[g] += ((sum[0] + sum[4]) + (sum[1] + sum[5])) +
              ((sum[2] + sum[6]) + (sum[3] + sum[7]));
      m[g] = m_new;
    }
    // 3. Weighted values.
    for (int i = 0; i < n; ++i) {
      row[i] = Rows::template load<T, D>(
          v_seq + (t0 + i) * p.v_strides[2], p.v_strides[3], rows + i * D);
    }
    for (int g = 0; g < G; ++g) {
      weighted_rows<D>(acc + g * D, scores + g * kTile, row, n);
    }
  }
}

template <typename T, int D>
using UnitFn = void (*)(const Problem<T>&, const Unit&, float*, Scratch&);

template <typename T, int D>
void attend_unit_baseline(
    const Problem<T>& p, const Unit& unit, float* state, Scratch& scratch) {
  attend_unit<T, D, PlainRows>(p, unit, state, scratch);
}

#ifdef TINY_LLM_X86_CLONES
// flatten inlines every helper into this function, so they are all compiled
// for AVX2/FMA/F16C here (and for the baseline in the function above).
template <typename T, int D>
__attribute__((target("avx2,fma,f16c"), flatten)) void attend_unit_avx2(
    const Problem<T>& p, const Unit& unit, float* state, Scratch& scratch) {
  attend_unit<T, D, F16cRows>(p, unit, state, scratch);
}

bool cpu_has_avx2_fma_f16c() {
  // F16C is CPUID leaf 1, ECX bit 29: clang rejects
  // __builtin_cpu_supports("f16c").
  static const bool yes = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx >> 29 & 1);
    return f16c && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

template <typename T, int D>
UnitFn<T, D> pick_unit_fn() {
#ifdef TINY_LLM_X86_CLONES
  if (cpu_has_avx2_fma_f16c()) {
    return &attend_unit_avx2<T, D>;
  }
#endif
  return &attend_unit_baseline<T, D>;
}

// Runs work(i) for every i in [0, n) on `threads` threads (the caller is one
// of them), each with its own worker from make_worker(). The first exception
// stops the others and is rethrown here once they have all finished.
template <class MakeWorker>
void parallel_for(size_t n, int threads, MakeWorker make_worker) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&]() {
    try {
      auto work = make_worker();
      for (size_t i = next++; i < n && !failed; i = next++) {
        work(i);
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

template <typename T, int D>
void decode_attention_cpu(const Problem<T>& p) {
  const int G = p.group;
  // The work units, grouped by (sequence, KV head) in order.
  std::vector<Unit> units;
  std::vector<size_t> first_unit; // of each (b, kv_head), plus an end marker
  size_t keys = 0;
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.kv_heads; ++h) {
      first_unit.push_back(units.size());
      for (int t = 0; t < p.lengths[b]; t += kChunk) {
        units.push_back({b, h, t, std::min(p.lengths[b], t + kChunk)});
      }
      keys += p.lengths[b];
    }
  }
  first_unit.push_back(units.size());

  // About 256 KiB of K/V per thread at least: below that, starting a thread
  // costs more than it saves.
  const size_t state_size = size_t(G) * (D + 2);
  std::vector<float> states(units.size() * state_size);
  const size_t bytes = keys * 2 * D * sizeof(T);
  const size_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int threads = static_cast<int>(std::max<size_t>(
      1, std::min({cores, units.size(), bytes / (256 * 1024)})));
  const UnitFn<T, D> attend = pick_unit_fn<T, D>();
  parallel_for(units.size(), threads, [&]() {
    return [&, scratch = Scratch(G, D)](size_t u) mutable {
      attend(p, units[u], states.data() + u * state_size, scratch);
    };
  });

  // Merge the units of each (sequence, KV head): rescale every partial sum
  // to the largest maximum, add, divide. No keys (length 0): zeros.
  std::vector<float> o(D);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.kv_heads; ++h) {
      const size_t begin = first_unit[b * p.kv_heads + h];
      const size_t end = first_unit[b * p.kv_heads + h + 1];
      for (int g = 0; g < G; ++g) {
        float big_m = kLowest;
        for (size_t u = begin; u < end; ++u) {
          big_m = std::max(big_m, states[u * state_size + g]);
        }
        float big_l = 0.0f;
        std::fill(o.begin(), o.end(), 0.0f);
        for (size_t u = begin; u < end; ++u) {
          const float* state = states.data() + u * state_size;
          const float f = std::exp(state[g] - big_m);
          big_l += state[G + g] * f;
          const float* acc = state + 2 * G + g * D;
          for (int d = 0; d < D; ++d) {
            o[d] += acc[d] * f;
          }
        }
        T* out = p.out + (int64_t(b) * p.heads + h * G + g) * D;
        for (int d = 0; d < D; ++d) {
          out[d] = static_cast<T>(big_l > 0.0f ? o[d] / big_l : 0.0f);
        }
      }
    }
  }
}

template <typename T>
void run_typed(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    mx::array& out,
    float scale) {
  Problem<T> p;
  p.query = query.data<T>();
  p.key = key.data<T>();
  p.value = value.data<T>();
  p.out = out.data<T>();
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = query.strides()[i];
  }
  for (int i = 0; i < 4; ++i) {
    p.k_strides[i] = key.strides()[i];
    p.v_strides[i] = value.strides()[i];
  }
  p.batch = query.shape(0);
  p.heads = query.shape(1);
  p.kv_heads = key.shape(1);
  p.group = p.heads / p.kv_heads;
  p.max_len = key.shape(2);
  p.scale = scale;
  // The lengths are values, not shapes: check them before any K/V is read.
  const int32_t* lens = lengths.data<int32_t>();
  const int64_t stride = lengths.strides()[0];
  for (int b = 0; b < p.batch; ++b) {
    const int32_t len = lens[b * stride];
    if (len < 0 || len > p.max_len) {
      throw std::out_of_range(
          "decode_attention: lengths[" + std::to_string(b) + "] is " +
          std::to_string(len) + ", outside [0, " + std::to_string(p.max_len) +
          "] (S, the keys the cache holds)");
    }
    p.lengths.push_back(len);
  }
  if (query.shape(2) == 64) {
    decode_attention_cpu<T, 64>(p);
  } else {
    decode_attention_cpu<T, 128>(p);
  }
}

} // namespace

void decode_attention_cpu(
    const mx::array& query,
    const mx::array& key,
    const mx::array& value,
    const mx::array& lengths,
    mx::array& out,
    float scale) {
  switch (out.dtype()) {
    case mx::float32:
      run_typed<float>(query, key, value, lengths, out, scale);
      break;
    case mx::float16:
      run_typed<mx::float16_t>(query, key, value, lengths, out, scale);
      break;
    case mx::bfloat16:
      run_typed<mx::bfloat16_t>(query, key, value, lengths, out, scale);
      break;
    default:
      throw std::runtime_error("decode_attention: unsupported dtype");
  }
}

} // namespace tiny_llm
