// Internal to prepack (host, src/api/prepack.cpp) and prepack_device (src/api/prepack_device.cu):
// the checks both run on the block scales of each matrix and the errors they report, so a bad
// checkpoint gives the same message on either path.
#pragma once
#include <cstdint>
#include <string>

#include "fp4moe/layout.h"
#include "fp4moe/problem.h"

namespace fp4moe::pack {

// The three matrices of an expert, in the order errors are reported.
enum MatrixKind : int { kGate = 0, kUp = 1, kDown = 2 };
const char* matrix_name(int kind);

// What a scan of one matrix's block scales found. first_nan is row * blocks_per_row + block of the
// first NaN code in row-major order, or -1.
struct ScaleStats {
  int64_t first_nan = -1;
  uint8_t nan_code = 0;
  int min_code = 255, max_code = 0;  // MXFP4 E8M0 codes
};

// Throws the error for the first problem of expert `expert`'s matrix `kind` (global expert index
// in the message), or returns the MXFP4 offset (0 for NVFP4).
int check_scales(Format f, const ScaleStats& s, int expert, int kind, int64_t blocks_per_row);

// The epilogue factors of one expert (MatrixScales), from its decode-direction global scales and
// MXFP4 offsets.
MatrixScales matrix_scales(Format f, bool gated, const float global[3], const int offset[3],
                           float in13, float in2);

}  // namespace fp4moe::pack
