// Bindings of the host-side FP4 formats: QuantizedMatrix, quantize / dequantize, global scales and
// the swizzled 128x4 scale layout. Every function takes and returns NumPy arrays.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <span>

#include "common.h"
#include "fp4moe/formats.h"

namespace fp4moe::py {
namespace {

float decode_direction(float g, ScaleDirection dir, const char* what) {
  FP4MOE_CHECK(std::isfinite(g) && g > 0.0f,
               what << " must be a finite positive number, got " << g);
  return dir == ScaleDirection::decode ? g
                                       : convert_global_scale(g, ScaleDirection::encode,
                                                              ScaleDirection::decode);
}

}  // namespace

QuantizedMatrix make_matrix(Format format, const Array& data, const Array& scales, float global_scale,
                            ScaleDirection direction, ScaleLayout layout, const char* what) {
  const std::string n = what;
  const std::string dname = n + ".data", sname = n + ".scales";
  FP4MOE_CHECK(data.ndim() == 2, dname << " must be a 2-D uint8 array [rows, cols / 2], got "
                                       << data.ndim() << " dimensions");
  QuantizedMatrix m;
  m.format = format;
  m.rows = int64_t(data.shape(0));
  m.cols = 2 * int64_t(data.shape(1));
  const int64_t kcols = m.cols / block_size(format);
  FP4MOE_CHECK(m.cols % block_size(format) == 0,
               n << ": cols = " << m.cols << " is not a multiple of the " << to_string(format)
                 << " block size " << block_size(format));
  m.data = to_vector<uint8_t>(data, dname.c_str(), {-1, -1});
  if (layout == ScaleLayout::linear) {
    m.scales = to_vector<uint8_t>(scales, sname.c_str(), {m.rows, kcols});
  } else {
    FP4MOE_CHECK(scales.ndim() == 1,
                 sname << " in the swizzled_128x4 layout must be 1-D (the padded byte stream)");
    const auto raw = to_vector<uint8_t>(scales, sname.c_str(), {-1});
    m.scales = scales_to_linear(raw, layout, m.rows, kcols);
  }
  if (format == Format::mxfp4) {
    FP4MOE_CHECK(global_scale == 1.0f, n << ": MXFP4 has no global scale; pass 1.0, got "
                                         << global_scale);
    m.global_scale = 1.0f;
  } else {
    m.global_scale = decode_direction(global_scale, direction, (n + ".global_scale").c_str());
  }
  validate(m, what);
  return m;
}

void bind_formats(nb::module_& m) {
  nb::class_<QuantizedMatrix>(m, "QuantizedMatrix",
                              "One FP4 matrix [rows, cols] in the checkpoint layout: two codes per "
                              "byte along K (element 2j in the low nibble), linear block scales "
                              "[rows, cols / block], global scale in the decode direction.")
      .def(
          "__init__",
          [](QuantizedMatrix* self, nb::handle data, nb::handle scales, nb::handle format_h,
             nb::handle global_scale, nb::handle direction_h, nb::handle layout_h) {
            const auto format = convert_field<Format>(format_h, "format");
            const auto direction = convert_field<ScaleDirection>(direction_h, "direction");
            const auto layout = convert_field<ScaleLayout>(layout_h, "scale_layout");
            const char* f8 = format == Format::nvfp4 ? "float8_e4m3fn" : "float8_e8m0fnu";
            new (self) QuantizedMatrix(make_matrix(format, to_array(data, "matrix.data"),
                                                   to_array(scales, "matrix.scales", f8),
                                                   to_float(global_scale, "matrix.global_scale"),
                                                   direction, layout, "matrix"));
          },
          nb::arg("data"), nb::arg("scales"), nb::arg("format") = Format::nvfp4,
          nb::arg("global_scale") = 1.0f, nb::arg("direction") = ScaleDirection::decode,
          nb::arg("scale_layout") = ScaleLayout::linear,
          "data: uint8 [rows, cols / 2]; scales: uint8 [rows, cols / block] (E4M3 codes for nvfp4, "
          "E8M0 for mxfp4), or the 1-D padded swizzled_128x4 stream; global_scale is read in "
          "`direction` and stored in the decode direction (must be 1 for mxfp4).")
      .def_ro("format", &QuantizedMatrix::format)
      .def_ro("rows", &QuantizedMatrix::rows)
      .def_ro("cols", &QuantizedMatrix::cols)
      .def_ro("global_scale", &QuantizedMatrix::global_scale, "Decode direction.")
      .def_prop_ro("block", &QuantizedMatrix::block)
      .def_prop_ro(
          "data",
          [](const QuantizedMatrix& q) {
            return to_numpy(q.data, {size_t(q.rows), size_t(q.cols / 2)});
          },
          nb::rv_policy::move, "A copy of the packed codes, uint8 [rows, cols / 2].")
      .def_prop_ro(
          "scales",
          [](const QuantizedMatrix& q) {
            return to_numpy(q.scales, {size_t(q.rows), size_t(q.scale_cols())});
          },
          nb::rv_policy::move, "A copy of the linear block scales, uint8 [rows, cols / block].")
      .def("element", [](const QuantizedMatrix& q, nb::handle r, nb::handle c) {
             return q.element(to_int<int64_t>(r, "row"), to_int<int64_t>(c, "col"));
           }, nb::arg("row"), nb::arg("col"))
      .def("__repr__", [](const QuantizedMatrix& q) {
        return "QuantizedMatrix(" + std::string(to_string(q.format)) + ", rows=" +
               std::to_string(q.rows) + ", cols=" + std::to_string(q.cols) +
               ", global_scale=" + std::to_string(q.global_scale) + ")";
      });

  m.def(
      "quantize_nvfp4",
      [](nb::handle xh, nb::handle gh, ScaleDirection direction) {
        const Array x = to_array(xh, "x");
        std::optional<float> global_scale;
        if (!gh.is_none()) global_scale = to_float(gh, "global_scale");
        FP4MOE_CHECK(x.ndim() == 2, "x must be a 2-D float32 array [rows, cols], got "
                                        << x.ndim() << " dimensions");
        const float* p = host_data<float>(x, "x", {-1, -1});
        const int64_t rows = int64_t(x.shape(0)), cols = int64_t(x.shape(1));
        float g;
        if (global_scale) {
          g = *global_scale;
        } else {
          float amax = 0.0f;
          for (size_t i = 0; i < x.size(); ++i) amax = std::max(amax, std::fabs(p[i]));
          // A non-finite x has no amax: quantize with 1 so the quantizer names the element.
          g = std::isfinite(amax) ? nvfp4_global_scale(amax) : 1.0f;
          direction = ScaleDirection::decode;
        }
        nb::gil_scoped_release nogil;
        return quantize_nvfp4(p, rows, cols, g, direction);
      },
      nb::arg("x"), nb::arg("global_scale").none() = nb::none(),
      nb::arg("direction") = ScaleDirection::decode,
      "NVFP4 with the ModelOpt recipe. x: float32 [rows, cols], cols a multiple of 16. "
      "global_scale is read in `direction`; None derives it from amax(|x|) / (6 * 448).");

  m.def(
      "quantize_mxfp4",
      [](nb::handle xh) {
        const Array x = to_array(xh, "x");
        FP4MOE_CHECK(x.ndim() == 2, "x must be a 2-D float32 array [rows, cols], got "
                                        << x.ndim() << " dimensions");
        const float* p = host_data<float>(x, "x", {-1, -1});
        const int64_t rows = int64_t(x.shape(0)), cols = int64_t(x.shape(1));
        nb::gil_scoped_release nogil;
        return quantize_mxfp4(p, rows, cols);
      },
      nb::arg("x"), "MXFP4 per OCP MX v1.0. x: float32 [rows, cols], cols a multiple of 32.");

  m.def(
      "dequantize",
      [](const QuantizedMatrix& q) {
        std::vector<float> out;
        {
          nb::gil_scoped_release nogil;
          out = dequantize(q);
        }
        return to_numpy(std::move(out), {size_t(q.rows), size_t(q.cols)});
      },
      nb::arg("m"), "float32 [rows, cols] values of an FP4 matrix.");

  m.def("nvfp4_global_scale", [](nb::handle a) { return nvfp4_global_scale(to_float(a, "amax")); },
        nb::arg("amax"),
        "Decode-direction NVFP4 global scale for a tensor of largest magnitude amax.");
  m.def("convert_global_scale", [](nb::handle g, ScaleDirection a, ScaleDirection b) {
          return convert_global_scale(to_float(g, "g"), a, b);
        }, nb::arg("g"), nb::arg("source"),
        nb::arg("target"), "Converts a global scale between directions (the reciprocal).");

  m.def(
      "swizzle_scales",
      [](nb::handle h) {
        const Array linear = to_array(h, "scales", "float8_e4m3fn");
        FP4MOE_CHECK(linear.ndim() == 2, "scales must be a 2-D uint8 array [rows, kcols], got "
                                             << linear.ndim() << " dimensions");
        const uint8_t* p = host_data<uint8_t>(linear, "scales", {-1, -1});
        const int64_t rows = int64_t(linear.shape(0)), kcols = int64_t(linear.shape(1));
        auto out = swizzle_scales_128x4(std::span<const uint8_t>(p, linear.size()), rows, kcols);
        const size_t n = out.size();
        return to_numpy(std::move(out), {n});
      },
      nb::arg("scales"),
      "Linear block scales uint8 [rows, kcols] -> the 1-D swizzled 128x4 byte stream (rows padded "
      "to 128, columns to 4; padding is 0).");
  m.def(
      "unswizzle_scales",
      [](nb::handle h, nb::handle rows_h, nb::handle kcols_h) {
        const Array swizzled = to_array(h, "scales", "float8_e4m3fn");
        const int64_t rows = to_int<int64_t>(rows_h, "rows"), kcols = to_int<int64_t>(kcols_h, "kcols");
        FP4MOE_CHECK(rows >= 0 && kcols >= 0, "rows and kcols must be non-negative, got rows = "
                                                  << rows << ", kcols = " << kcols);
        const uint8_t* p = host_data<uint8_t>(swizzled, "scales", {-1});
        auto out = unswizzle_scales_128x4(std::span<const uint8_t>(p, swizzled.size()), rows, kcols);
        return to_numpy(std::move(out), {size_t(rows), size_t(kcols)});
      },
      nb::arg("scales"), nb::arg("rows"), nb::arg("kcols"),
      "The swizzled 128x4 byte stream -> linear uint8 [rows, kcols].");
  m.def("swizzled_size", [](nb::handle rows, nb::handle kcols) {
          return swizzled_128x4_size(to_int<int64_t>(rows, "rows"), to_int<int64_t>(kcols, "kcols"));
        }, nb::arg("rows"), nb::arg("kcols"),
        "Padded byte count of the swizzled 128x4 layout.");
}

}  // namespace fp4moe::py
