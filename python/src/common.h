// Shared pieces of the Python bindings: argument checks on DLPack arrays that fail with an
// fp4moe::Error naming the argument, and conversions from C++ containers to NumPy arrays.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
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
