"""Loads librelattn, which registers the ops under ``torch.ops.relattn``."""
import os

import torch

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PATH = os.path.join(_PKG_DIR, "lib", "librelattn.so")

if not os.path.exists(LIBRARY_PATH):
    raise ImportError(
        f"relattn: the compiled library {LIBRARY_PATH} is missing; build the package first "
        "(pip install --no-build-isolation .)"
    )
torch.ops.load_library(LIBRARY_PATH)

#: Prefix for CMake's ``find_package(relattn)`` (add it to ``CMAKE_PREFIX_PATH``).
cmake_prefix_path = os.path.join(_PKG_DIR, "lib", "cmake")
