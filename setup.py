"""Build of moekit's extension ``moe._C`` (torch.utils.cpp_extension).

The C++ sources in ``csrc/`` are always built (CPU kernels, op schemas). The CUDA sources in
``csrc/cuda/`` are built when a CUDA toolkit is found and a GPU is visible at build time;
``MOE_BUILD_CUDA=1`` builds them without a GPU (CI does, so a CUDA compile error fails it),
``MOE_BUILD_CUDA=0`` never. The arch list comes from ``TORCH_CUDA_ARCH_LIST`` (default
"8.0;9.0"), never from querying a device. The build prints one line saying what it builds.

Objects are kept in ``build/`` next to this file (ninja's incremental build), so a second
``pip install -e .`` on the same checkout (the README's second command after the first) only
relinks what did not change.

moekit's Hopper grouped GEMM (``csrc/cuda/sm90/``, CUTLASS 3) is built when the arch list holds
9.0 and CUTLASS's C++ headers are found: ``$CUTLASS_INCLUDE_DIR``, else the PyPI wheel
``nvidia-cutlass`` (``cutlass_library/source/include``), a build-time dependency (the ``cuda``
extra). Those units need no torch headers and are compiled by nvcc for sm_90a alone, in parallel
(``MAX_JOBS``), then linked into ``moe._C``; ``MOE_BUILD_SM90=0`` skips them, ``=1`` makes missing
headers an error.
"""

import concurrent.futures
import glob
import importlib.util
import os
import shlex
import shutil
import subprocess
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


def _gpu_visible() -> bool:
    """A CUDA device this build could run on (torch's own check; no kernels are compiled for it)."""
    import torch

    return torch.cuda.is_available()


def _want_cuda(cuda_home):
    flag = os.environ.get("MOE_BUILD_CUDA")
    if flag is not None:
        return flag.strip() not in ("0", "", "false", "False", "no")
    return cuda_home is not None and _gpu_visible()


def _find_cutlass():
    """The folder holding CUTLASS 3's ``cute/`` and ``cutlass/`` headers, or None."""
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        if not os.path.exists(os.path.join(env, "cute", "tensor.hpp")):
            sys.exit(f"CUTLASS_INCLUDE_DIR={env} does not hold cute/tensor.hpp")
        return env
    spec = importlib.util.find_spec("cutlass_library")  # the nvidia-cutlass wheel, not imported
    for loc in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(loc, "source", "include")
        if os.path.exists(os.path.join(inc, "cute", "tensor.hpp")):
            return inc
    return None


def _want_sm90(arch_list):
    """(build the sm90 GEMM?, CUTLASS include dir)."""
    flag = os.environ.get("MOE_BUILD_SM90", "").strip()
    if flag in ("0", "false", "False", "no"):
        return False, None
    archs = [a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not any(a.split("+")[0] in ("9.0", "9.0a") for a in archs):
        if flag:
            sys.exit(f"MOE_BUILD_SM90={flag} but TORCH_CUDA_ARCH_LIST={arch_list!r} has no 9.0")
        return False, None
    inc = _find_cutlass()
    if inc is None:
        msg = ("moekit: CUTLASS 3 headers not found, so the Hopper grouped GEMM (csrc/cuda/sm90) is not "
               "built and bf16 GEMMs on sm90 use PyTorch's kernel: `pip install nvidia-cutlass` or set "
               "CUTLASS_INCLUDE_DIR")
        if flag:
            sys.exit(msg)
        print(msg, file=sys.stderr)
        return False, None
    return True, inc


cuda_home = _find_cuda_home()
build_cuda = _want_cuda(cuda_home)
if build_cuda:
    if cuda_home is None:
        sys.exit("MOE_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder that holds bin/nvcc")
    # torch reads CUDA_HOME when cpp_extension is imported, so it must be set first.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    build_sm90, cutlass_include = _want_sm90(os.environ["TORCH_CUDA_ARCH_LIST"])
else:
    build_sm90, cutlass_include = False, None

if build_cuda:
    print(f"moekit build: CPU kernels, CUDA kernels for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}{' and the sm90 GEMM' if build_sm90 else ''} "
          "(MOE_BUILD_CUDA=0: CPU only; the CUDA units take a few minutes each on 2 cores)", file=sys.stderr)
else:
    print("moekit build: CPU kernels only ("
          + ("no GPU visible" if cuda_home is not None and "MOE_BUILD_CUDA" not in os.environ
             else "no CUDA toolkit found" if cuda_home is None else "MOE_BUILD_CUDA=0")
          + "; MOE_BUILD_CUDA=1 with a CUDA toolkit builds the CUDA kernels too)", file=sys.stderr)

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
    if build_sm90:
        define_macros.append(("MOE_WITH_SM90_GEMM", None))
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
        # The sm90 objects are linked in by BuildExt: a change there must relink moe._C.
        depends=sorted(glob.glob(os.path.join("csrc", "cuda", "sm90", "*"))) if build_sm90 else [],
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

SM90_DIR = os.path.join("csrc", "cuda", "sm90")


def _compile_sm90(build_temp):
    """nvcc -c each csrc/cuda/sm90/*.cu for sm_90a (in parallel, skipping objects newer than every
    source and header there); returns the object paths."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    out_dir = os.path.join(build_temp, "sm90")
    os.makedirs(out_dir, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(SM90_DIR, "*.cu")))
    newest_dep = max(os.path.getmtime(f) for f in glob.glob(os.path.join(SM90_DIR, "*")))
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo",
             "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC",
             f"-I{cutlass_include}", f"-I{os.path.join(here, 'csrc')}"]
    flags += shlex.split(os.environ.get("MOE_NVCC_FLAGS", ""))

    def compile_one(src):
        obj = os.path.join(out_dir, os.path.basename(src)[:-3] + ".o")
        if os.path.exists(obj) and os.path.getmtime(obj) > newest_dep:
            return obj, ""
        cmd = [nvcc, "-c", src, "-o", obj, *flags]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{' '.join(cmd)}\n{run.stdout}{run.stderr}")
        return obj, f"[sm90] {' '.join(cmd)}\n{run.stdout}{run.stderr}"

    jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(compile_one, sources))
    for _, log in results:
        if log:
            print(log, flush=True)  # the ptxas report, with MOE_NVCC_FLAGS="-Xptxas -v"
    return [obj for obj, _ in results]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build, plus the sm90 objects compiled first and linked into moe._C."""

    def build_extensions(self):
        # A fixed folder in the checkout, not pip's temporary one: ninja then skips the objects
        # that are up to date when the same checkout is installed again.
        self.build_temp = os.path.join(here, "build", f"temp-{sys.implementation.cache_tag}")
        os.makedirs(self.build_temp, exist_ok=True)
        if build_sm90:
            objects = _compile_sm90(self.build_temp)
            for ext in self.extensions:
                ext.extra_objects = [o for o in ext.extra_objects if not o.startswith(self.build_temp)] + objects
        super().build_extensions()


setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExt},
)
