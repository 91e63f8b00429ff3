"""Builds relattn's Python package from CMakeLists.txt, the project's one build description.

    pip install --no-build-isolation .

uses the torch that is already installed (an isolated build would fetch a second one). The CUDA
kernels are compiled when nvcc and a CUDA build of torch are present; CMake says loudly when not.
Environment: RELATTN_CUDA=AUTO|ON|OFF, RELATTN_BUILD_TESTS=1 (also build the GoogleTest suite),
RELATTN_BUILD_DIR (default build/cmake, reused between builds), MAX_JOBS.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).parent.resolve()


class CMakeBuildPy(build_py):
    """Runs the CMake build and installs the library, headers and CMake package into the package."""

    def run(self):
        super().run()
        try:
            import torch
        except ImportError:
            sys.exit("relattn: building needs torch installed first (pip install torch), then "
                     "pip install --no-build-isolation .")
        build_dir = Path(os.environ.get("RELATTN_BUILD_DIR", ROOT / "build" / "cmake"))
        pkg_dir = Path(self.build_lib) / "relattn"
        tests = os.environ.get("RELATTN_BUILD_TESTS", "0").lower() in ("1", "on", "true", "yes")
        cfg = ["cmake", "-S", str(ROOT), "-B", str(build_dir),
               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
               "-DCMAKE_BUILD_TYPE=Release",
               f"-DRELATTN_PYTHON={sys.executable}",
               f"-DRELATTN_CUDA={os.environ.get('RELATTN_CUDA', 'AUTO')}",
               f"-DRELATTN_BUILD_TESTS={'ON' if tests else 'OFF'}"]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        subprocess.check_call(["cmake", "--install", str(build_dir), "--prefix", str(pkg_dir)])


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True


setup(
    name="relattn",
    version="0.1.0",
    description="Fused attention with relative positions (Shaw, T5, ALiBi, structural) for PyTorch and LibTorch",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"workbench": ["tqdm", "matplotlib"], "test": ["pytest", "expecttest"]},
    package_dir={"": "python"},
    packages=["relattn"],
    cmdclass={"build_py": CMakeBuildPy},
    distclass=BinaryDistribution,
    zip_safe=False,
)
