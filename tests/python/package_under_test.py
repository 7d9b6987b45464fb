"""How the Python tests find the fp4moe package under test: the extension in FP4MOE_BUILD_DIR/python
when that build has one (ctest sets FP4MOE_BUILD_DIR), else an installed fp4moe. A test module skips
when neither exists; it fails instead when FP4MOE_REQUIRE_PACKAGE=1 (the caller installed it) or when
the build produced the extension but importing it fails (a bug, not a missing package)."""

import importlib
import os
import pathlib
import sys

import pytest


def import_fp4moe(*submodules: str):
    """fp4moe (and `fp4moe.<submodule>` for each name given), or a module-level skip."""
    build = os.environ.get("FP4MOE_BUILD_DIR")
    built = bool(build) and bool(list((pathlib.Path(build) / "python" / "fp4moe").glob("_C*")))
    if built:
        sys.path.insert(0, str(pathlib.Path(build) / "python"))
    try:
        fp4moe = importlib.import_module("fp4moe")
        for name in submodules:
            importlib.import_module(f"fp4moe.{name}")
    except ImportError as e:
        if os.environ.get("FP4MOE_REQUIRE_PACKAGE") == "1" or built:
            raise
        pytest.skip(f"fp4moe is neither installed nor built in FP4MOE_BUILD_DIR ({e}); build the "
                    "fp4moe_python target or run `pip install .`", allow_module_level=True)
    return fp4moe


def require_gpu(fp4moe, torch):
    """A module-level skip, saying why, unless PyTorch sees a CUDA device and fp4moe's GPU path runs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to PyTorch", allow_module_level=True)
    if not fp4moe.gpu_available():
        pytest.skip(f"fp4moe GPU path unavailable: {fp4moe.gpu_unavailable_reason()}",
                    allow_module_level=True)
