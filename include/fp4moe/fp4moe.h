// Umbrella header of the fp4moe library.
#pragma once
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/layout.h"
#include "fp4moe/moe.h"
#include "fp4moe/plan.h"
#include "fp4moe/prepack_device.h"
#include "fp4moe/presets.h"
#include "fp4moe/problem.h"
#include "fp4moe/reference.h"
#include "fp4moe/types.h"
#include "fp4moe/weights.h"
