// metal:: math, relational, geometric and integer functions on scalars and vectors.
// Floating functions compute in float and round back to the argument's type (half, bfloat),
// element-wise on vectors. metal::fast:: and metal::precise:: name the same functions: on a CPU
// there is one float implementation, close to `precise`.
#pragma once
#pragma GCC system_header
#include "vec.h"

namespace metalsim::detail {

// Apply f (float -> float) to a floating scalar or each component of a floating vector.
template <class X, class F>
norm_t<X> map_float(const X& x, F f) {
  using R = norm_t<X>;
  if constexpr (is_vec_v<X>) {
    R v = x, r;
    for (int i = 0; i < width_v<X>; ++i) r.d[i] = elem_t<X>(f(float(v.d[i])));
    return r;
  } else {
    return R(f(float(x)));
  }
}

// The type two or three operands combine to: the vector type if any operand is a vector
// (operands must then agree on width), else the common scalar type.
template <class A, class B>
struct common2 {
  using NA = norm_t<A>;
  using NB = norm_t<B>;
  static_assert(!(is_vec_v<A> && is_vec_v<B>) || std::is_same_v<NA, NB>,
                "metalsim: the vector operands of this function must have the same type");
  using type = std::conditional_t<is_vec_v<A>, NA,
                                  std::conditional_t<is_vec_v<B>, NB, scalar_common_t<NA, NB>>>;
};
template <class A, class B>
using common_t = typename common2<std::remove_cvref_t<A>, std::remove_cvref_t<B>>::type;
template <class A, class B, class C>
using common3_t = common_t<common_t<A, B>, C>;

template <class R, class F>
R zip2(const R& a, const R& b, F f) {
  if constexpr (is_vec_v<R>) {
    R r;
    for (int i = 0; i < width_v<R>; ++i) r.d[i] = f(a.d[i], b.d[i]);
    return r;
  } else {
    return f(a, b);
  }
}
template <class R, class F>
R zip3(const R& a, const R& b, const R& c, F f) {
  if constexpr (is_vec_v<R>) {
    R r;
    for (int i = 0; i < width_v<R>; ++i) r.d[i] = f(a.d[i], b.d[i], c.d[i]);
    return r;
  } else {
    return f(a, b, c);
  }
}
// Element-wise predicate: bool for a scalar, vec<bool, N> for a vector.
template <class X, class F>
auto map_bool(const X& x, F f) {
  if constexpr (is_vec_v<X>) {
    norm_t<X> v = x;
    vec<bool, width_v<X>> r;
    for (int i = 0; i < width_v<X>; ++i) r.d[i] = f(v.d[i]);
    return r;
  } else {
    return bool(f(x));
  }
}

template <class X>
concept floating = is_float_v<elem_t<X>>;
template <class X>
concept numeric = is_float_v<elem_t<X>> || is_int_v<elem_t<X>>;
template <class X>
concept integer = is_int_v<elem_t<X>>;

template <class T>
T max1(T a, T b) {
  if constexpr (is_float_v<T>)
    return T(__builtin_fmaxf(float(a), float(b)));
  else
    return a > b ? a : b;
}
template <class T>
T min1(T a, T b) {
  if constexpr (is_float_v<T>)
    return T(__builtin_fminf(float(a), float(b)));
  else
    return a < b ? a : b;
}

}  // namespace metalsim::detail

namespace metal {
namespace ms_math {
using namespace ::metalsim::detail;

#define MS_UNARY_FLOAT(name, expr)                              \
  template <floating X>                                         \
  ::metalsim::norm_t<X> name(const X& x) {                      \
    return map_float(x, [](float v) -> float { return expr; }); \
  }
MS_UNARY_FLOAT(exp, __builtin_expf(v))
MS_UNARY_FLOAT(exp2, __builtin_exp2f(v))
MS_UNARY_FLOAT(exp10, __builtin_powf(10.0f, v))
MS_UNARY_FLOAT(log, __builtin_logf(v))
MS_UNARY_FLOAT(log2, __builtin_log2f(v))
MS_UNARY_FLOAT(log10, __builtin_log10f(v))
MS_UNARY_FLOAT(sqrt, __builtin_sqrtf(v))
MS_UNARY_FLOAT(rsqrt, 1.0f / __builtin_sqrtf(v))
MS_UNARY_FLOAT(sin, __builtin_sinf(v))
MS_UNARY_FLOAT(cos, __builtin_cosf(v))
MS_UNARY_FLOAT(tan, __builtin_tanf(v))
MS_UNARY_FLOAT(asin, __builtin_asinf(v))
MS_UNARY_FLOAT(acos, __builtin_acosf(v))
MS_UNARY_FLOAT(atan, __builtin_atanf(v))
MS_UNARY_FLOAT(sinh, __builtin_sinhf(v))
MS_UNARY_FLOAT(cosh, __builtin_coshf(v))
MS_UNARY_FLOAT(tanh, __builtin_tanhf(v))
MS_UNARY_FLOAT(asinh, __builtin_asinhf(v))
MS_UNARY_FLOAT(acosh, __builtin_acoshf(v))
MS_UNARY_FLOAT(atanh, __builtin_atanhf(v))
MS_UNARY_FLOAT(sinpi, __builtin_sinf(v * 3.14159265358979323846f))
MS_UNARY_FLOAT(cospi, __builtin_cosf(v * 3.14159265358979323846f))
MS_UNARY_FLOAT(tanpi, __builtin_tanf(v * 3.14159265358979323846f))
MS_UNARY_FLOAT(erf, __builtin_erff(v))
MS_UNARY_FLOAT(floor, __builtin_floorf(v))
MS_UNARY_FLOAT(ceil, __builtin_ceilf(v))
MS_UNARY_FLOAT(round, __builtin_roundf(v))
MS_UNARY_FLOAT(rint, __builtin_rintf(v))
MS_UNARY_FLOAT(trunc, __builtin_truncf(v))
MS_UNARY_FLOAT(fabs, __builtin_fabsf(v))
MS_UNARY_FLOAT(fract, __builtin_fminf(v - __builtin_floorf(v), 0x1.fffffep-1f))
MS_UNARY_FLOAT(saturate, __builtin_fminf(__builtin_fmaxf(v, 0.0f), 1.0f))
MS_UNARY_FLOAT(sign, v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : (v == v ? v : 0.0f)))
#undef MS_UNARY_FLOAT

template <numeric X>
::metalsim::norm_t<X> abs(const X& x) {
  using R = ::metalsim::norm_t<X>;
  if constexpr (floating<X>) {
    return fabs(x);
  } else {
    R v = x;
    return zip2(v, v, [](auto a, auto) { return decltype(a)(a < 0 ? -a : a); });
  }
}

#define MS_BINARY(name, concept_, body)                             \
  template <concept_ A, concept_ B>                                 \
  common_t<A, B> name(const A& a, const B& b) {                     \
    using R = common_t<A, B>;                                       \
    using T = ::metalsim::elem_t<R>;                                \
    return zip2(R(a), R(b), [](T x, T y) -> T { return T(body); }); \
  }
MS_BINARY(max, numeric, max1(x, y))
MS_BINARY(min, numeric, min1(x, y))
MS_BINARY(fmax, floating, __builtin_fmaxf(float(x), float(y)))
MS_BINARY(fmin, floating, __builtin_fminf(float(x), float(y)))
MS_BINARY(pow, floating, __builtin_powf(float(x), float(y)))
MS_BINARY(powr, floating, __builtin_powf(float(x), float(y)))
MS_BINARY(atan2, floating, __builtin_atan2f(float(x), float(y)))
MS_BINARY(fmod, floating, __builtin_fmodf(float(x), float(y)))
MS_BINARY(copysign, floating, __builtin_copysignf(float(x), float(y)))
MS_BINARY(fdim, floating, __builtin_fdimf(float(x), float(y)))
MS_BINARY(step, floating, float(y) < float(x) ? 0.0f : 1.0f)
MS_BINARY(divide, floating, float(x) / float(y))
#undef MS_BINARY

#define MS_TERNARY(name, concept_, body)                                       \
  template <concept_ A, concept_ B, concept_ C>                                \
  common3_t<A, B, C> name(const A& a, const B& b, const C& c) {                \
    using R = common3_t<A, B, C>;                                              \
    using T = ::metalsim::elem_t<R>;                                           \
    return zip3(R(a), R(b), R(c), [](T x, T y, T z) -> T { return T(body); }); \
  }
MS_TERNARY(clamp, numeric, min1(max1(x, y), z))
MS_TERNARY(fma, floating, __builtin_fmaf(float(x), float(y), float(z)))
MS_TERNARY(mad, floating, __builtin_fmaf(float(x), float(y), float(z)))
MS_TERNARY(mix, floating, float(x) + (float(y) - float(x)) * float(z))
MS_TERNARY(smoothstep, floating,
           (float(z) <= float(x) ? 0.0f
            : float(z) >= float(y)
                ? 1.0f
                : ((float(z) - float(x)) / (float(y) - float(x))) *
                      ((float(z) - float(x)) / (float(y) - float(x))) *
                      (3.0f - 2.0f * ((float(z) - float(x)) / (float(y) - float(x))))))
#undef MS_TERNARY

// select(a, b, c): c ? b : a, element-wise when c is a bool vector.
template <class A, class B, class C>
common_t<A, B> select(const A& a, const B& b, const C& c) {
  using R = common_t<A, B>;
  R ra(a), rb(b);
  if constexpr (::metalsim::is_vec_v<C>) {
    static_assert(::metalsim::width_v<C> == ::metalsim::width_v<R>,
                  "metalsim: select() condition must have as many components as the values");
    ::metalsim::norm_t<C> cv = c;
    R r;
    for (int i = 0; i < ::metalsim::width_v<R>; ++i) r.d[i] = cv.d[i] ? rb.d[i] : ra.d[i];
    return r;
  } else {
    return bool(c) ? rb : ra;
  }
}

template <floating X>
auto isnan(const X& x) {
  return map_bool(x, [](auto v) { return __builtin_isnan(float(v)); });
}
template <floating X>
auto isinf(const X& x) {
  return map_bool(x, [](auto v) { return __builtin_isinf(float(v)) != 0; });
}
template <floating X>
auto isfinite(const X& x) {
  return map_bool(x, [](auto v) { return __builtin_isfinite(float(v)); });
}
template <floating X>
auto signbit(const X& x) {
  return map_bool(x, [](auto v) { return __builtin_signbit(float(v)) != 0; });
}
template <class X>
bool all(const X& x) {
  if constexpr (::metalsim::is_vec_v<X>) {
    ::metalsim::norm_t<X> v = x;
    for (int i = 0; i < ::metalsim::width_v<X>; ++i)
      if (!v.d[i]) return false;
    return true;
  } else {
    return bool(x);
  }
}
template <class X>
bool any(const X& x) {
  if constexpr (::metalsim::is_vec_v<X>) {
    ::metalsim::norm_t<X> v = x;
    for (int i = 0; i < ::metalsim::width_v<X>; ++i)
      if (v.d[i]) return true;
    return false;
  } else {
    return bool(x);
  }
}

// Geometric functions (vectors of float, half or bfloat).
template <class A, class B>
::metalsim::elem_t<common_t<A, B>> dot(const A& a, const B& b) {
  using R = common_t<A, B>;
  static_assert(::metalsim::is_vec_v<R>, "metalsim: dot() takes vectors");
  R x(a), y(b);
  auto s = x.d[0] * y.d[0];
  for (int i = 1; i < ::metalsim::width_v<R>; ++i) s = s + x.d[i] * y.d[i];
  return s;
}
template <floating X>
::metalsim::elem_t<X> length_squared(const X& x) {
  return dot(x, x);
}
template <floating X>
::metalsim::elem_t<X> length(const X& x) {
  return ::metalsim::elem_t<X>(__builtin_sqrtf(float(dot(x, x))));
}
template <floating A, floating B>
::metalsim::elem_t<common_t<A, B>> distance(const A& a, const B& b) {
  using R = common_t<A, B>;
  return length(R(a) - R(b));
}
template <floating X>
::metalsim::norm_t<X> normalize(const X& x) {
  ::metalsim::norm_t<X> v = x;
  return v * ::metalsim::elem_t<X>(1.0f / __builtin_sqrtf(float(dot(v, v))));
}
template <floating A, floating B>
common_t<A, B> cross(const A& a, const B& b) {
  using R = common_t<A, B>;
  static_assert(::metalsim::width_v<R> == 3, "metalsim: cross() takes 3-component vectors");
  R x(a), y(b);
  return R(x.y * y.z - x.z * y.y, x.z * y.x - x.x * y.z, x.x * y.y - x.y * y.x);
}

// Integer functions.
template <integer X>
::metalsim::norm_t<X> popcount(const X& x) {
  using R = ::metalsim::norm_t<X>;
  R v = x;
  return zip2(v, v, [](auto a, auto) {
    return decltype(a)(__builtin_popcountll(
        static_cast<unsigned long long>(static_cast<std::make_unsigned_t<decltype(a)>>(a))));
  });
}
template <integer X>
::metalsim::norm_t<X> clz(const X& x) {
  using R = ::metalsim::norm_t<X>;
  R v = x;
  return zip2(v, v, [](auto a, auto) {
    using U = std::make_unsigned_t<decltype(a)>;
    U u = static_cast<U>(a);
    constexpr int bits = int(sizeof(U) * 8);
    return decltype(a)(u == 0 ? bits : __builtin_clzll(u) - (64 - bits));
  });
}
template <integer X>
::metalsim::norm_t<X> ctz(const X& x) {
  using R = ::metalsim::norm_t<X>;
  R v = x;
  return zip2(v, v, [](auto a, auto) {
    using U = std::make_unsigned_t<decltype(a)>;
    U u = static_cast<U>(a);
    return decltype(a)(u == 0 ? int(sizeof(U) * 8) : __builtin_ctzll(u));
  });
}
template <integer A, integer B>
common_t<A, B> mulhi(const A& a, const B& b) {
  using R = common_t<A, B>;
  return zip2(R(a), R(b), [](auto x, auto y) {
    using T = decltype(x);
    constexpr int bits = int(sizeof(T) * 8);
    if constexpr (std::is_signed_v<T>)
      return T((static_cast<long long>(x) * static_cast<long long>(y)) >> bits);
    else
      return T((static_cast<unsigned long long>(x) * static_cast<unsigned long long>(y)) >> bits);
  });
}

}  // namespace ms_math

using namespace ms_math;
namespace fast {
using namespace ::metal::ms_math;
}
namespace precise {
using namespace ::metal::ms_math;
}

}  // namespace metal
