"""Build of mmim_ext and its compiled extension ``mmim_ext._C``.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) against an installed torch.

Build switches (the package's own start with ``MMIM_EXT_``; the others are the PyTorch build
ecosystem's). Every switch, build and run time, is listed in docs/design.md ("Environment
variables").

* ``MMIM_EXT_NO_EXTENSION=1``: install the pure-Python package only (everything falls back).
* ``MMIM_EXT_WITH_CUDA=1`` (or torch's ``FORCE_CUDA=1``): build the CUDA kernels (needs
  ``CUDA_HOME`` and a CUDA build of torch). Unset, CUDA is built when both a toolkit and a CUDA
  build of torch are present; ``=0`` turns that off. No GPU is queried at build time.
* ``MMIM_EXT_DEBUG=1``: ``-O0 -g``.
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures; default ``8.0;9.0+PTX`` when unset.
* ``MAX_JOBS``: parallel compile jobs (read by torch's build helper).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


# A switch's name from before every switch took the MMIM_EXT_ prefix fails loudly rather than
# being ignored: a CUDA build asked for under the old name would silently come out CPU-only.
for _old, _new in {"MMIM_WITH_CUDA": "MMIM_EXT_WITH_CUDA"}.items():
    if _old in os.environ:
        sys.exit(f"setup.py: the environment variable {_old} is now called {_new}; set {_new} instead")


def _flag(name: str) -> bool | None:
    val = os.environ.get(name)
    if val is None or val == "":
        return None
    return val not in ("0", "false", "False", "no")


def _want_cuda() -> bool:
    forced = _flag("FORCE_CUDA")
    if forced is None:
        forced = _flag("MMIM_EXT_WITH_CUDA")
    if forced is not None:
        return forced
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    if _flag("MMIM_EXT_NO_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = bool(_flag("MMIM_EXT_DEBUG"))
    # -g0: Python's CFLAGS (which setuptools passes first) carry -g; debug info made the CPU
    # kernels' files compile about a third slower and is not needed outside MMIM_EXT_DEBUG.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # The C++ standard is torch's choice (it passes -std=c++20 itself; its headers need it).
    # -ffp-contract=fast lets the compiler fuse a*b+c into FMAs (off by default in ISO modes).
    # -falign-loops=64 -falign-functions=64: every loop starts on a 64-byte line, so that where the
    # hot sample loops land does not depend on the code before them (the one pass ran 0.94x the
    # time of the unaligned build; docs/performance.md).
    cxx += ["-fvisibility=hidden", "-ffp-contract=fast", "-Wno-psabi", "-falign-loops=64", "-falign-functions=64"]
    link = []
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is an inline template whose OpenMP pragma is compiled into *this*
        # library: without -fopenmp the CPU kernels would silently run on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Never ask a GPU: without one torch would guess; pick Ampere and Hopper (+PTX).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("MMIM_EXT_WITH_CUDA", "1"))
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
        # No -std here: torch's build passes its own (C++20 since torch 2.13; the 2.14 headers
        # need it, e.g. std::strong_ordering), and nvcc rejects two -std options.
        nvcc += ["-lineinfo"]
        ext = CUDAExtension(
            "mmim_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "mmim_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="mmim_ext",
    version="0.1.0",
    description="Fused pairwise MINE statistics, MMIM regularizers and information-plane tools for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    packages=find_packages(include=["mmim_ext", "mmim_ext.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "plots": ["matplotlib"],
        "experiments": ["matplotlib", "scikit-learn", "mnist1d"],
    },
    entry_points={"console_scripts": ["mmim-ext = mmim_ext.experiments.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
