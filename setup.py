"""Build of moekit's extension ``moe._C`` (torch.utils.cpp_extension).

The C++ sources in ``csrc/`` are always built (CPU kernels, op schemas). The CUDA sources in
``csrc/cuda/`` are built whenever a CUDA toolkit is found; ``MOE_BUILD_CUDA=0`` or ``=1``
overrides the detection. The arch list comes from ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"),
never from querying a device, so the build works on machines without a GPU.
"""

import glob
import os
import shlex
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    """The toolkit folder that holds bin/nvcc and lib64/libcudart (CUDA_HOME wins)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda(cuda_home):
    flag = os.environ.get("MOE_BUILD_CUDA")
    if flag is not None:
        return flag.strip() not in ("0", "", "false", "False", "no")
    return cuda_home is not None


cuda_home = _find_cuda_home()
build_cuda = _want_cuda(cuda_home)
if build_cuda:
    if cuda_home is None:
        sys.exit("MOE_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder that holds bin/nvcc")
    # torch reads CUDA_HOME when cpp_extension is imported, so it must be set first.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
# -fopenmp: at::parallel_for (ATen's OpenMP backend) is inlined into our kernels; without it
# every CPU kernel would run on one thread.
# -ffp-contract=off: no fused multiply-add, so the AVX-512 dispatch loops (csrc/cpu_vec.h) round
# exactly as the scalar loops and the PyTorch twins do.
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
link_flags = ["-fopenmp"]
# MOE_PYTHON_MODULE: registration.cpp defines PyInit__C only in the Python build (the CMake
# library for C++ users has no Python dependency).
define_macros = [("MOE_PYTHON_MODULE", None)]
include_dirs = [os.path.join(here, "csrc")]

if build_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    define_macros.append(("MOE_WITH_CUDA", None))
    # torch's CUDAContext.h includes cuBLAS/cuSPARSE headers; pip's CUDA wheels keep them here.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    for sub in ("cu13", "cu12"):
        inc = os.path.join(site, "nvidia", sub, "include")
        if os.path.isdir(inc):
            include_dirs.append(inc)
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    cccl = os.path.join(cuda_home, "include", "cccl")
    if os.path.isdir(cccl):
        include_dirs.append(cccl)
    extension = CUDAExtension(
        "moe._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            # MOE_NVCC_FLAGS: extra nvcc flags, e.g. "-Xptxas -v" for bench/gpu_check.sh's report.
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
            + shlex.split(os.environ.get("MOE_NVCC_FLAGS", "")),
        },
    )
else:
    extension = CppExtension(
        "moe._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags},
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
