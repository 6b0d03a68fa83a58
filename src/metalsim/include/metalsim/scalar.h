// MSL scalar types: half (_Float16), bfloat (round-to-nearest-even struct), the integer names,
// and the traits the rest of the shim dispatches on.
#pragma once
#pragma GCC system_header
#include <cstdint>
#include <type_traits>

// g++ before 13 has no _Float16 in C++ on aarch64: there, __fp16 (arithmetic in float,
// rounded to half on assignment) stands in.
#if defined(__aarch64__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ < 13
#define METALSIM_HALF __fp16
#else
#define METALSIM_HALF _Float16
#endif
typedef METALSIM_HALF half;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

namespace metalsim {

constexpr uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(u >> 16);
}
constexpr float bf16_bits_to_f32(uint16_t b) {
  return __builtin_bit_cast(float, uint32_t(b) << 16);
}

template <class T>
inline constexpr bool is_int_v = std::is_integral_v<T> && !std::is_same_v<T, bool>;
template <class T>
inline constexpr bool is_builtin_float_v =
    std::is_same_v<T, float> || std::is_same_v<T, METALSIM_HALF>;
// Scalars the shim accepts as arithmetic operands (bool and bfloat are handled separately).
template <class T>
inline constexpr bool is_num_v = is_int_v<T> || is_builtin_float_v<T>;

}  // namespace metalsim

// bfloat: 8-bit exponent, 7-bit mantissa. Arithmetic happens in float and rounds back, as on
// the GPU; mixing with float gives float, with an integer gives bfloat.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  constexpr bfloat(float f) : bits(metalsim::f32_to_bf16_bits(f)) {}
  template <class U>
  requires(metalsim::is_num_v<U> && !std::is_same_v<U, float>) constexpr bfloat(U u)
      : bfloat(float(u)) {}
  constexpr operator float() const {
    return metalsim::bf16_bits_to_f32(bits);
  }
  static constexpr bfloat from_bits(uint16_t b) {
    bfloat r{};
    r.bits = b;
    return r;
  }

  constexpr bfloat operator-() const {
    return from_bits(uint16_t(bits ^ 0x8000u));
  }
  constexpr bfloat operator+() const {
    return *this;
  }

#define MS_BF_ARITH(op)                                                                          \
  friend constexpr bfloat operator op(bfloat a, bfloat b) {                                      \
    return float(a) op float(b);                                                                 \
  }                                                                                              \
  template <class U>                                                                             \
  requires metalsim::is_int_v<U>                                                                 \
  friend constexpr bfloat operator op(bfloat a, U b) {                                           \
    return float(a) op float(b);                                                                 \
  }                                                                                              \
  template <class U>                                                                             \
  requires metalsim::is_int_v<U>                                                                 \
  friend constexpr bfloat operator op(U a, bfloat b) {                                           \
    return float(a) op float(b);                                                                 \
  }                                                                                              \
  template <class U>                                                                             \
  requires metalsim::is_builtin_float_v<U>                                                       \
  friend constexpr float operator op(bfloat a, U b) {                                            \
    return float(a) op float(b);                                                                 \
  }                                                                                              \
  template <class U>                                                                             \
  requires metalsim::is_builtin_float_v<U>                                                       \
  friend constexpr float operator op(U a, bfloat b) {                                            \
    return float(a) op float(b);                                                                 \
  }                                                                                              \
  template <class U>                                                                             \
  requires(metalsim::is_num_v<U> || std::is_same_v<U, bfloat>) constexpr bfloat& operator op##=( \
      U b) {                                                                                     \
    return *this = bfloat(float(*this) op float(b));                                             \
  }
  MS_BF_ARITH(+)
  MS_BF_ARITH(-)
  MS_BF_ARITH(*)
  MS_BF_ARITH(/)
#undef MS_BF_ARITH

#define MS_BF_CMP(op)                                     \
  friend constexpr bool operator op(bfloat a, bfloat b) { \
    return float(a) op float(b);                          \
  }                                                       \
  template <class U>                                      \
  requires metalsim::is_num_v<U>                          \
  friend constexpr bool operator op(bfloat a, U b) {      \
    return float(a) op float(b);                          \
  }                                                       \
  template <class U>                                      \
  requires metalsim::is_num_v<U>                          \
  friend constexpr bool operator op(U a, bfloat b) {      \
    return float(a) op float(b);                          \
  }
  MS_BF_CMP(==)
  MS_BF_CMP(!=)
  MS_BF_CMP(<)
  MS_BF_CMP(>)
  MS_BF_CMP(<=)
  MS_BF_CMP(>=)
#undef MS_BF_CMP
};
static_assert(sizeof(bfloat) == 2 && alignof(bfloat) == 2);
static_assert(std::is_trivially_copyable_v<bfloat>);

namespace metalsim {
template <class T>
inline constexpr bool is_float_v = is_builtin_float_v<T> || std::is_same_v<T, bfloat>;
template <class T>
inline constexpr bool is_scalar_v =
    is_num_v<T> || std::is_same_v<T, bfloat> || std::is_same_v<T, bool>;

// The type of a binary operation between two scalars (MSL's usual conversions, extended to
// half and bfloat): float beats half and bfloat, half and bfloat together give float, any
// floating type beats integers, integers follow C++.
template <class A, class B>
struct scalar_common {
  using type = decltype(A() + B());
};
template <class A>
struct scalar_common<A, A> {
  using type = A;
};
template <class B>
requires is_int_v<B>
struct scalar_common<bfloat, B> {
  using type = bfloat;
};
template <class A>
requires is_int_v<A>
struct scalar_common<A, bfloat> {
  using type = bfloat;
};
template <>
struct scalar_common<bfloat, float> {
  using type = float;
};
template <>
struct scalar_common<float, bfloat> {
  using type = float;
};
template <>
struct scalar_common<bfloat, METALSIM_HALF> {
  using type = float;
};
template <>
struct scalar_common<METALSIM_HALF, bfloat> {
  using type = float;
};
template <class A, class B>
using scalar_common_t = typename scalar_common<A, B>::type;

// float view of a floating scalar, for math done in float and rounded back.
template <class T>
constexpr float to_f(T x) {
  return float(x);
}
}  // namespace metalsim
