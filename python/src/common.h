// Shared pieces of the Python bindings: argument checks on DLPack arrays that fail with an
// fp4moe::Error naming the argument, and conversions from C++ containers to NumPy arrays.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <string>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe::py {

namespace nb = nanobind;

using Array = nb::ndarray<nb::ro>;        // any DLPack / buffer-protocol array, read-only view
using MutArray = nb::ndarray<>;           // any DLPack array the call writes into

inline nb::dlpack::dtype bf16_dtype() {
  return nb::dlpack::dtype{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
}

inline std::string dtype_name(nb::dlpack::dtype t) {
  std::string kind;
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: kind = "code" + std::to_string(t.code) + "_"; break;
  }
  return kind + std::to_string(t.bits);
}

template <class T>
nb::dlpack::dtype dtype_of() {
  return nb::dtype<T>();
}

inline bool same_dtype(nb::dlpack::dtype a, nb::dlpack::dtype b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

template <class A>
std::string shape_string(const A& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

inline std::string shape_string(std::initializer_list<int64_t> shape) {
  std::string s = "[";
  size_t i = 0;
  for (int64_t d : shape) s += (i++ ? ", " : "") + (d < 0 ? std::string("*") : std::to_string(d));
  return s + "]";
}

template <class A>
bool c_contiguous(const A& a) {
  for (size_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) == 0) return true;  // an empty array has no layout (exporters report any strides)
  int64_t expect = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expect) return false;
    expect *= a.shape(i);
  }
  return true;
}

enum class Where { cpu, cuda };

// Checks dtype, shape (-1 matches any extent), C-contiguity and device of `a`; throws fp4moe::Error
// naming `name` otherwise.
template <class A>
void check_array(const A& a, const char* name, nb::dlpack::dtype want,
                 std::initializer_list<int64_t> shape, Where where) {
  const bool on_cpu = a.device_type() == nb::device::cpu::value;
  const bool on_cuda = a.device_type() == nb::device::cuda::value;
  if (where == Where::cpu) {
    FP4MOE_CHECK(on_cpu, name << " must be a host (CPU) array, e.g. a NumPy array");
  } else {
    FP4MOE_CHECK(on_cuda, name << " must be a CUDA tensor");
  }
  FP4MOE_CHECK(same_dtype(a.dtype(), want),
               name << " must have dtype " << dtype_name(want) << ", got " << dtype_name(a.dtype()));
  bool ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int64_t d : shape) {
    if (ok && d >= 0 && int64_t(a.shape(i)) != d) ok = false;
    ++i;
  }
  FP4MOE_CHECK(ok, name << " must have shape " << shape_string(shape) << ", got " << shape_string(a));
  FP4MOE_CHECK(c_contiguous(a), name << " must be C-contiguous (row-major); pass a contiguous copy");
}

template <class T, class A>
const T* host_data(const A& a, const char* name, std::initializer_list<int64_t> shape) {
  check_array(a, name, dtype_of<T>(), shape, Where::cpu);
  return static_cast<const T*>(a.data());
}

template <class T>
std::vector<T> to_vector(const Array& a, const char* name, std::initializer_list<int64_t> shape) {
  const T* p = host_data<T>(a, name, shape);
  return std::vector<T>(p, p + a.size());
}

// ---- arguments from arbitrary Python objects ------------------------------------------------------
// The bindings take array and integer arguments as plain objects and convert them here, so that a
// wrong type or an out-of-range value is an fp4moe.Error naming the argument, the expected and the
// given value, never nanobind's "incompatible function arguments".

// str(h) as a std::string ("" when str() itself fails).
inline std::string py_str(nb::handle h) {
  PyObject* s = PyObject_Str(h.ptr());
  if (s == nullptr) {
    PyErr_Clear();
    return "";
  }
  const char* c = PyUnicode_AsUTF8(s);
  std::string out = c != nullptr ? c : "";
  if (c == nullptr) PyErr_Clear();
  Py_DECREF(s);
  return out;
}

// Python type name (or NumPy dtype) of an object, for messages.
inline std::string describe(nb::handle h) {
  std::string s = Py_TYPE(h.ptr())->tp_name;
  if (PyLong_Check(h.ptr()) || PyFloat_Check(h.ptr()) || PyUnicode_Check(h.ptr())) {
    PyObject* r = PyObject_Repr(h.ptr());
    const char* c = r != nullptr ? PyUnicode_AsUTF8(r) : nullptr;
    if (c != nullptr) s += std::string(" ") + (std::strlen(c) > 60 ? std::string(c, 60) + "..." : std::string(c));
    if (c == nullptr) PyErr_Clear();
    Py_XDECREF(r);
  }
  if (nb::hasattr(h, "dtype")) s += " of dtype " + py_str(nb::object(h.attr("dtype")));
  return s;
}

// `h` as a read-only array (NumPy, DLPack or buffer protocol). `float8_ok` names the one ml_dtypes
// type that is accepted as its bits (float8_e4m3fn for NVFP4 scales, float8_e8m0fnu for MXFP4
// scales, as uint8; bfloat16 as uint16), or is null; any other ml_dtypes type is refused naming the
// expected dtype.
inline Array to_array(nb::handle h, const char* name, const char* float8_ok = nullptr) {
  nb::object obj = nb::borrow(h);
  if (nb::hasattr(obj, "dtype") && nb::hasattr(obj, "view")) {
    const std::string dt = py_str(nb::object(obj.attr("dtype")));
    // The ml_dtypes types (their buffers do not export through DLPack).
    const bool ml = dt.rfind("float8_", 0) == 0 || dt.rfind("float4_", 0) == 0 ||
                    dt.rfind("float6_", 0) == 0 || dt == "bfloat16" || dt == "int4" || dt == "uint4" ||
                    dt == "int2" || dt == "uint2";
    if (ml) {
      FP4MOE_CHECK(float8_ok != nullptr && dt == float8_ok,
                   name << " must have dtype uint8" << (float8_ok ? std::string(" or ") + float8_ok : std::string())
                        << ", got " << dt);
      obj = obj.attr("view")(nb::module_::import_("numpy").attr(dt == "bfloat16" ? "uint16" : "uint8"));
    }
  }
  try {
    return nb::cast<Array>(obj);
  } catch (const nb::cast_error&) {
    FP4MOE_FAIL(name << " must be an array (NumPy, DLPack or buffer protocol), got " << describe(h));
  }
}

// `h` as a writable array (outputs, workspaces).
inline MutArray to_mut_array(nb::handle h, const char* name) {
  try {
    return nb::cast<MutArray>(h);
  } catch (const nb::cast_error&) {
    FP4MOE_FAIL(name << " must be a writable array (DLPack), got " << describe(h));
  }
}

inline std::optional<Array> to_opt_array(nb::handle h, const char* name, const char* float8_ok = nullptr) {
  if (h.is_none()) return std::nullopt;
  return to_array(h, name, float8_ok);
}

// `h` as an integer of type T (Python int or anything with __index__, e.g. numpy.int64; not bool).
template <class T>
T to_int(nb::handle h, const char* name) {
  static_assert(std::is_integral_v<T>);
  constexpr long long lo = std::is_signed_v<T> ? static_cast<long long>(std::numeric_limits<T>::min()) : 0;
  const unsigned long long hi = static_cast<unsigned long long>(std::numeric_limits<T>::max());
  const bool is_bool = PyBool_Check(h.ptr());
  PyObject* idx = is_bool ? nullptr : PyNumber_Index(h.ptr());
  if (idx == nullptr) {
    PyErr_Clear();
    FP4MOE_FAIL(name << " must be an integer in [" << lo << ", " << hi << "], got " << describe(h));
  }
  nb::object i = nb::steal(idx);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  bool ok = overflow == 0 && v >= lo;
  if (ok && v >= 0) ok = static_cast<unsigned long long>(v) <= hi;
  if (!ok && overflow > 0 && hi > static_cast<unsigned long long>(std::numeric_limits<long long>::max())) {
    const unsigned long long u = PyLong_AsUnsignedLongLong(i.ptr());
    if (!PyErr_Occurred()) return static_cast<T>(u);
    PyErr_Clear();
  }
  FP4MOE_CHECK(ok, name << " must be an integer in [" << lo << ", " << hi << "], got "
                        << py_str(i));
  return static_cast<T>(v);
}

// A finite float argument (float32 range).
inline float to_float(nb::handle h, const char* name) {
  const double d = PyFloat_AsDouble(h.ptr());
  if (d == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    FP4MOE_FAIL(name << " must be a number, got " << describe(h));
  }
  FP4MOE_CHECK(!(std::isfinite(d) && std::fabs(d) > 3.4028234663852886e38),
               name << " = " << d << " is outside the float32 range");
  return static_cast<float>(d);
}

// `v` as a T: bool (True / False only), integers (checked range), floats (float32 range) and bound
// classes / enums; anything else is an fp4moe.Error naming `label`, the expected and the given type.
template <class T>
T convert_field(nb::handle v, const char* label) {
  if constexpr (std::is_same_v<T, bool>) {
    FP4MOE_CHECK(PyBool_Check(v.ptr()), label << " must be True or False, got " << describe(v));
    return v.ptr() == Py_True;
  } else if constexpr (std::is_integral_v<T>) {
    return to_int<T>(v, label);
  } else if constexpr (std::is_floating_point_v<T>) {
    return to_float(v, label);
  } else {
    T out{};
    if (!nb::try_cast<T>(v, out))
      FP4MOE_FAIL(label << " must be a " << nb::type_name(nb::type<T>()).c_str() << ", got " << describe(v));
    return out;
  }
}

// A NumPy array that owns a moved-in std::vector.
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::initializer_list<size_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), shape, owner);
}

template <class T>
nb::ndarray<nb::numpy, T> to_numpy(const std::vector<T>& v, std::initializer_list<size_t> shape) {
  return to_numpy(std::vector<T>(v), shape);
}

// A QuantizedMatrix from NumPy arrays in the checkpoint layout (see fp4moe.QuantizedMatrix).
QuantizedMatrix make_matrix(Format format, const Array& data, const Array& scales, float global_scale,
                            ScaleDirection direction, ScaleLayout layout, const char* what);

void bind_types(nb::module_& m);
void bind_formats(nb::module_& m);
void bind_weights(nb::module_& m);
void bind_gpu(nb::module_& m);
void bind_checkpoint(nb::module_& m);

}  // namespace fp4moe::py
