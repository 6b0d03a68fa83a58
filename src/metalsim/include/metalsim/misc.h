// numeric_limits, as_type, MSL's constant macros, and metal::array.
#pragma once
#pragma GCC system_header
#include "vec.h"

namespace metal {

template <class T>
struct numeric_limits;
template <class T>
requires ::metalsim::is_int_v<T>
struct numeric_limits<T> {
  static constexpr bool is_specialized = true, is_signed = std::is_signed_v<T>, is_integer = true;
  static constexpr bool has_infinity = false, has_quiet_NaN = false;
  static constexpr int digits = int(sizeof(T) * 8) - (std::is_signed_v<T> ? 1 : 0);
  static constexpr T min() {
    return lowest();
  }
  static constexpr T lowest() {
    return std::is_signed_v<T> ? T(T(1) << digits) : T(0);
  }
  static constexpr T max() {
    return T(~lowest());
  }
};
template <>
struct numeric_limits<float> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false;
  static constexpr bool has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 24;
  static constexpr float min() {
    return __FLT_MIN__;
  }
  static constexpr float max() {
    return __FLT_MAX__;
  }
  static constexpr float lowest() {
    return -__FLT_MAX__;
  }
  static constexpr float epsilon() {
    return __FLT_EPSILON__;
  }
  static constexpr float infinity() {
    return __builtin_huge_valf();
  }
  static constexpr float quiet_NaN() {
    return __builtin_nanf("");
  }
  static constexpr float denorm_min() {
    return __FLT_DENORM_MIN__;
  }
};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false;
  static constexpr bool has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 11;
  static constexpr half min() {
    return half(0x1p-14f);
  }
  static constexpr half max() {
    return half(65504.0f);
  }
  static constexpr half lowest() {
    return half(-65504.0f);
  }
  static constexpr half epsilon() {
    return half(0x1p-10f);
  }
  static constexpr half infinity() {
    return half(__builtin_huge_valf());
  }
  static constexpr half quiet_NaN() {
    return half(__builtin_nanf(""));
  }
  static constexpr half denorm_min() {
    return half(0x1p-24f);
  }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false;
  static constexpr bool has_infinity = true, has_quiet_NaN = true;
  static constexpr int digits = 8;
  static constexpr bfloat min() {
    return bfloat::from_bits(0x0080);
  }
  static constexpr bfloat max() {
    return bfloat::from_bits(0x7f7f);
  }
  static constexpr bfloat lowest() {
    return bfloat::from_bits(0xff7f);
  }
  static constexpr bfloat epsilon() {
    return bfloat::from_bits(0x3c00);
  }
  static constexpr bfloat infinity() {
    return bfloat::from_bits(0x7f80);
  }
  static constexpr bfloat quiet_NaN() {
    return bfloat::from_bits(0x7fc0);
  }
  static constexpr bfloat denorm_min() {
    return bfloat::from_bits(0x0001);
  }
};
template <>
struct numeric_limits<bool> {
  static constexpr bool is_specialized = true, is_signed = false, is_integer = true;
  static constexpr bool min() {
    return false;
  }
  static constexpr bool max() {
    return true;
  }
  static constexpr bool lowest() {
    return false;
  }
};

// Reinterpret the bits of a value as another type of the same size.
template <class To, class From>
To as_type(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "metalsim: as_type<T>(x) needs sizeof(T) == sizeof(x)");
  To to;
  __builtin_memcpy(static_cast<void*>(&to), static_cast<const void*>(&from), sizeof(To));
  return to;
}

// metal::array<T, N>: a fixed-size array with size() and [].
template <class T, unsigned long N>
struct array {
  T elems[N];
  T& operator[](unsigned long i) {
    return elems[i];
  }
  const T& operator[](unsigned long i) const {
    return elems[i];
  }
  static constexpr unsigned long size() {
    return N;
  }
  T* data() {
    return elems;
  }
  const T* data() const {
    return elems;
  }
  T* begin() {
    return elems;
  }
  T* end() {
    return elems + N;
  }
  const T* begin() const {
    return elems;
  }
  const T* end() const {
    return elems + N;
  }
};

template <class T, unsigned long N>
struct array_ref;  // not provided: metalsim rejects it in the source scan

}  // namespace metal

using metal::as_type;

#define MAXFLOAT __FLT_MAX__
#define HUGE_VALF (__builtin_huge_valf())
#define INFINITY (__builtin_huge_valf())
#define NAN (__builtin_nanf(""))
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define FLT_EPSILON __FLT_EPSILON__
#define HALF_MAX (half(65504.0f))
#define HALF_MIN (half(0x1p-14f))
#define HALF_EPSILON (half(0x1p-10f))
#define CHAR_BIT 8
#define SCHAR_MAX 127
#define SCHAR_MIN (-128)
#define UCHAR_MAX 255
#define SHRT_MAX 32767
#define SHRT_MIN (-32768)
#define USHRT_MAX 65535
#define INT_MAX 2147483647
#define INT_MIN (-2147483647 - 1)
#define UINT_MAX 4294967295u
#define LONG_MAX __LONG_MAX__
#define LONG_MIN (-__LONG_MAX__ - 1L)
#define ULONG_MAX (__LONG_MAX__ * 2UL + 1UL)
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f
#define M_LOG2E_H (half(M_LOG2E_F))
#define M_LN2_H (half(M_LN2_F))
#define M_PI_H (half(M_PI_F))
