// MSL vector types: vec<T, N> with MSL's sizes and alignment (a 3-vector takes the space of a
// 4-vector), component and swizzle access (.x, .xy, .zyx, .rgba, ...), element-wise operators,
// and packed_vec<T, N> (packed_float3 and friends, no padding).
#pragma once
#pragma GCC system_header
#include "scalar.h"
#include "swizzles.inc"

namespace metalsim {

template <class T, int N>
struct vec;
template <class T, int N>
struct packed_vec;
template <class T, int N, int... I>
struct swz;

// What kind of value X is: its element type, its width, and the vec<> it converts to.
template <class X>
struct vinfo {
  using elem = X;
  using norm = X;
  static constexpr int width = 1;
  static constexpr bool is_vec = false;
};
template <class T, int N>
struct vinfo<vec<T, N>> {
  using elem = T;
  using norm = vec<T, N>;
  static constexpr int width = N;
  static constexpr bool is_vec = true;
};
template <class T, int N, int... I>
struct vinfo<swz<T, N, I...>> {
  using elem = T;
  using norm = vec<T, int(sizeof...(I))>;
  static constexpr int width = sizeof...(I);
  static constexpr bool is_vec = true;
};
template <class T, int N>
struct vinfo<packed_vec<T, N>> {
  using elem = T;
  using norm = vec<T, N>;
  static constexpr int width = N;
  static constexpr bool is_vec = true;
};
template <class X>
using norm_t = typename vinfo<std::remove_cvref_t<X>>::norm;
template <class X>
inline constexpr bool is_vec_v = vinfo<std::remove_cvref_t<X>>::is_vec;
template <class X>
inline constexpr int width_v = vinfo<std::remove_cvref_t<X>>::width;
template <class X>
using elem_t = typename vinfo<std::remove_cvref_t<X>>::elem;

template <int... I>
constexpr bool distinct() {
  int v[] = {I...};
  for (unsigned a = 0; a < sizeof...(I); ++a)
    for (unsigned b = a + 1; b < sizeof...(I); ++b)
      if (v[a] == v[b]) return false;
  return true;
}

// Element-wise operators as hidden friends of vec<T, N> (a base class, so found through ADL and
// with implicit conversions of the other operand). Swizzles and packed vectors are proxies:
// their operators (below) convert them to vec<T, N> first.
template <class V>
struct vec_ops;
template <class T, int N>
struct vec_ops<vec<T, N>> {
  using V = vec<T, N>;
  using B = vec<bool, N>;
  static constexpr bool arith = !std::is_same_v<T, bool>;
  static constexpr bool integral = std::is_integral_v<T>;
  static constexpr bool integer = is_int_v<T>;

#define MS_VEC_BINARY(op, cond)                                 \
  friend V operator op(const V& a, const V& b) requires(cond) { \
    V r;                                                        \
    for (int i = 0; i < N; ++i) r.d[i] = T(a.d[i] op b.d[i]);   \
    return r;                                                   \
  }                                                             \
  friend V operator op(const V& a, T b) requires(cond) {        \
    V r;                                                        \
    for (int i = 0; i < N; ++i) r.d[i] = T(a.d[i] op b);        \
    return r;                                                   \
  }                                                             \
  friend V operator op(T a, const V& b) requires(cond) {        \
    V r;                                                        \
    for (int i = 0; i < N; ++i) r.d[i] = T(a op b.d[i]);        \
    return r;                                                   \
  }
  MS_VEC_BINARY(+, arith)
  MS_VEC_BINARY(-, arith)
  MS_VEC_BINARY(*, arith)
  MS_VEC_BINARY(/, arith)
  MS_VEC_BINARY(%, integer)
  MS_VEC_BINARY(&, integral)
  MS_VEC_BINARY(|, integral)
  MS_VEC_BINARY(^, integral)
  MS_VEC_BINARY(<<, integer)
  MS_VEC_BINARY(>>, integer)
#undef MS_VEC_BINARY

#define MS_VEC_COMPARE(op)                                 \
  friend B operator op(const V& a, const V& b) {           \
    B r;                                                   \
    for (int i = 0; i < N; ++i) r.d[i] = a.d[i] op b.d[i]; \
    return r;                                              \
  }                                                        \
  friend B operator op(const V& a, T b) {                  \
    B r;                                                   \
    for (int i = 0; i < N; ++i) r.d[i] = a.d[i] op b;      \
    return r;                                              \
  }                                                        \
  friend B operator op(T a, const V& b) {                  \
    B r;                                                   \
    for (int i = 0; i < N; ++i) r.d[i] = a op b.d[i];      \
    return r;                                              \
  }
  MS_VEC_COMPARE(==)
  MS_VEC_COMPARE(!=)
  MS_VEC_COMPARE(<)
  MS_VEC_COMPARE(>)
  MS_VEC_COMPARE(<=)
  MS_VEC_COMPARE(>=)
  MS_VEC_COMPARE(&&)
  MS_VEC_COMPARE(||)
#undef MS_VEC_COMPARE

  friend V operator-(const V& a) requires arith {
    V r;
    for (int i = 0; i < N; ++i) r.d[i] = T(-a.d[i]);
    return r;
  }
  friend V operator+(const V& a) requires arith {
    return a;
  }
  friend V operator~(const V& a) requires integral {
    V r;
    for (int i = 0; i < N; ++i) r.d[i] = T(~a.d[i]);
    return r;
  }
  friend B operator!(const V& a) {
    B r;
    for (int i = 0; i < N; ++i) r.d[i] = !a.d[i];
    return r;
  }
};

// A swizzle: a view of the whole storage of a vec<T, N> that reads and writes components I...
template <class T, int N, int... I>
struct swz {
  static constexpr int M = sizeof...(I);
  using V = vec<T, M>;
  T d[N == 3 ? 4 : N];

  operator V() const {
    return V(d[I]...);
  }
  T operator[](int i) const {
    constexpr int idx[] = {I...};
    return d[idx[i]];
  }
  swz& operator=(const V& v) {
    static_assert(distinct<I...>(),
                  "metalsim: cannot assign to a swizzle that repeats a component");
    int k = 0;
    ((d[I] = v.d[k++]), ...);
    return *this;
  }
  swz& operator=(const swz& o) {
    return *this = V(o);
  }
#define MS_SWZ_COMPOUND(op)          \
  template <class U>                 \
  swz& operator op##=(const U& u) {  \
    return *this = V(V(*this) op u); \
  }
  MS_SWZ_COMPOUND(+)
  MS_SWZ_COMPOUND(-)
  MS_SWZ_COMPOUND(*)
  MS_SWZ_COMPOUND(/)
#undef MS_SWZ_COMPOUND
};

template <class T, int N>
struct vec_storage;
template <class T>
struct vec_storage<T, 2> {
  union {
    T d[2];
    struct {
      T x, y;
    };
    struct {
      T r, g;
    };
    MS_SWIZZLES_2(T)
  };
};
template <class T>
struct vec_storage<T, 3> {
  union {
    T d[4];
    struct {
      T x, y, z;
    };
    struct {
      T r, g, b;
    };
    MS_SWIZZLES_3(T)
  };
};
template <class T>
struct vec_storage<T, 4> {
  union {
    T d[4];
    struct {
      T x, y, z, w;
    };
    struct {
      T r, g, b, a;
    };
    MS_SWIZZLES_4(T)
  };
};

template <class T, int N>
struct alignas(sizeof(T) * (N == 3 ? 4 : N)) vec : vec_storage<T, N>, vec_ops<vec<T, N>> {
  static_assert(N >= 2 && N <= 4, "metalsim: vectors have 2, 3 or 4 components");
  static_assert(is_scalar_v<T>, "metalsim: vector element must be a scalar type");
  using element_type = T;
  using vec_storage<T, N>::d;

  vec() = default;
  vec(const vec&) = default;
  vec& operator=(const vec& o) {
    __builtin_memcpy(static_cast<void*>(d), static_cast<const void*>(o.d), sizeof(d));
    return *this;
  }
  // A scalar fills every component (MSL allows `float4 v = 0.0f;`).
  template <class U>
  requires is_scalar_v<U> vec(U s) {
    for (int i = 0; i < N; ++i) d[i] = T(s);
  }
  // float4(half4), float2(v.xy): element-wise conversion, explicit as in MSL.
  template <class X>
  requires(is_vec_v<X>&& width_v<X> == N &&
           !std::is_same_v<std::remove_cvref_t<X>, vec>) explicit vec(const X& o) {
    norm_t<X> v = o;
    for (int i = 0; i < N; ++i) d[i] = T(v.d[i]);
  }
  // float4(a, b, c, d), float4(v.xy, 0, 1), float3(v2, z), ...
  template <class... A>
  requires(sizeof...(A) >= 2 && (width_v<A> + ...) == N) vec(const A&... a) {
    int k = 0;
    (put(k, a), ...);
  }

  T& operator[](int i) {
    return d[i];
  }
  const T& operator[](int i) const {
    return d[i];
  }

#define MS_VEC_COMPOUND(op)         \
  template <class U>                \
  vec& operator op##=(const U& u) { \
    return *this = vec(*this op u); \
  }
  MS_VEC_COMPOUND(+)
  MS_VEC_COMPOUND(-)
  MS_VEC_COMPOUND(*)
  MS_VEC_COMPOUND(/)
  MS_VEC_COMPOUND(%)
  MS_VEC_COMPOUND(&)
  MS_VEC_COMPOUND(|)
  MS_VEC_COMPOUND(^)
  MS_VEC_COMPOUND(<<)
  MS_VEC_COMPOUND(>>)
#undef MS_VEC_COMPOUND

 private:
  template <class A>
  void put(int& k, const A& a) {
    if constexpr (is_vec_v<A>) {
      norm_t<A> v = a;
      for (int j = 0; j < width_v<A>; ++j) d[k++] = T(v.d[j]);
    } else {
      d[k++] = T(a);
    }
  }
};

// packed_float3 and friends: no padding, element alignment; converts to and from vec<T, N>.
template <class T, int N>
struct packed_vec {
  T d[N];
  packed_vec() = default;
  packed_vec(const vec<T, N>& v) {
    for (int i = 0; i < N; ++i) d[i] = v.d[i];
  }
  template <class... A>
  requires(sizeof...(A) >= 2 && (width_v<A> + ...) == N) packed_vec(const A&... a)
      : packed_vec(vec<T, N>(a...)) {}
  operator vec<T, N>() const {
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r.d[i] = d[i];
    return r;
  }
  T& operator[](int i) {
    return d[i];
  }
  const T& operator[](int i) const {
    return d[i];
  }
  template <class U>
  packed_vec& operator+=(const U& u) {
    return *this = vec<T, N>(vec<T, N>(*this) + u);
  }
  template <class U>
  packed_vec& operator*=(const U& u) {
    return *this = vec<T, N>(vec<T, N>(*this) * u);
  }
};

template <class X>
struct is_proxy : std::false_type {};
template <class T, int N, int... I>
struct is_proxy<swz<T, N, I...>> : std::true_type {};
template <class T, int N>
struct is_proxy<packed_vec<T, N>> : std::true_type {};
template <class X>
inline constexpr bool is_proxy_v = is_proxy<std::remove_cvref_t<X>>::value;

#define MS_PROXY_BINARY(op)                                                            \
  template <class S, class U>                                                          \
  requires is_proxy_v<S>                                                               \
  auto operator op(const S& a, const U& b) {                                           \
    return norm_t<S>(a) op b;                                                          \
  }                                                                                    \
  template <class U, class S>                                                          \
  requires(is_proxy_v<S> && !is_proxy_v<U>) auto operator op(const U& a, const S& b) { \
    return a op norm_t<S>(b);                                                          \
  }
MS_PROXY_BINARY(+)
MS_PROXY_BINARY(-)
MS_PROXY_BINARY(*)
MS_PROXY_BINARY(/)
MS_PROXY_BINARY(%)
MS_PROXY_BINARY(&)
MS_PROXY_BINARY(|)
MS_PROXY_BINARY(^)
MS_PROXY_BINARY(<<)
MS_PROXY_BINARY(>>)
MS_PROXY_BINARY(==)
MS_PROXY_BINARY(!=)
MS_PROXY_BINARY(<)
MS_PROXY_BINARY(>)
MS_PROXY_BINARY(<=)
MS_PROXY_BINARY(>=)
#undef MS_PROXY_BINARY
template <class S>
requires is_proxy_v<S>
auto operator-(const S& a) {
  return -norm_t<S>(a);
}

}  // namespace metalsim

template <class T, int N>
using vec = metalsim::vec<T, N>;

#define MS_VEC_NAMES(T, name)                          \
  typedef metalsim::vec<T, 2> name##2;                 \
  typedef metalsim::vec<T, 3> name##3;                 \
  typedef metalsim::vec<T, 4> name##4;                 \
  typedef metalsim::packed_vec<T, 2> packed_##name##2; \
  typedef metalsim::packed_vec<T, 3> packed_##name##3; \
  typedef metalsim::packed_vec<T, 4> packed_##name##4;
MS_VEC_NAMES(float, float)
MS_VEC_NAMES(half, half)
MS_VEC_NAMES(bfloat, bfloat)
MS_VEC_NAMES(int, int)
MS_VEC_NAMES(uint, uint)
MS_VEC_NAMES(short, short)
MS_VEC_NAMES(ushort, ushort)
MS_VEC_NAMES(char, char)
MS_VEC_NAMES(uchar, uchar)
MS_VEC_NAMES(long, long)
MS_VEC_NAMES(ulong, ulong)
MS_VEC_NAMES(bool, bool)
#undef MS_VEC_NAMES

static_assert(sizeof(float3) == 16 && alignof(float3) == 16);
static_assert(sizeof(float2) == 8 && alignof(float2) == 8);
static_assert(sizeof(half3) == 8 && alignof(half3) == 8);
static_assert(sizeof(half4) == 8 && sizeof(bfloat4) == 8);
static_assert(sizeof(uchar3) == 4 && sizeof(bool4) == 4);
static_assert(sizeof(packed_float3) == 12 && alignof(packed_float3) == 4);
