"""Build of moekit's extension ``moe._C`` (torch.utils.cpp_extension).

The C++ sources in ``csrc/`` are always built (CPU kernels, op schemas). The CUDA sources in
``csrc/cuda/`` are built when a CUDA toolkit is found and a GPU is visible at build time;
``MOE_BUILD_CUDA=1`` builds them without a GPU (CI does, so a CUDA compile error fails it),
``MOE_BUILD_CUDA=0`` never. The arch list comes from ``TORCH_CUDA_ARCH_LIST`` (default
"8.0;9.0"), never from querying a device. The build prints one line saying what it builds;
where it builds CUDA it also says how many units it compiles, an estimate of the time, and a
progress line every 30 s, on the terminal (pip shows a build's own output only with -v).

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
import contextlib
import glob
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

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


def _progress_stream():
    """Where build progress goes: the terminal when there is one (pip captures the build's
    stdout and stderr and shows them only with -v or on failure), else stderr."""
    try:
        return open("/dev/tty", "w")
    except OSError:
        return contextlib.nullcontext(sys.stderr)


# One unit's compile time on one core of the 2-core CI machine, about: a C++ unit, a CUDA unit.
UNIT_SECONDS = {".cpp": 20, ".cu": 60}


def _estimate_seconds(units, jobs):
    return sum(UNIT_SECONDS[os.path.splitext(u)[1]] for u in units) / jobs


@contextlib.contextmanager
def _report_progress(build_temp, sources, jobs, interval=30):
    """Every 30 s, one line: compiled units out of those to compile, elapsed time and an estimate
    of the rest (UNIT_SECONDS over `jobs` parallel jobs, less the time spent; once half the units
    are done, the rate so far). A unit is to compile when its object is missing or older than its
    source (header changes are not counted)."""
    start = time.time()

    def objects():
        return glob.glob(os.path.join(build_temp, "**", "*.o"), recursive=True)

    def object_suffixes(src):  # csrc/x.cpp -> csrc/x.o, csrc/cuda/x.cu -> csrc/cuda/x[.cuda].o, sm90/x.o
        stem = os.path.splitext(os.path.basename(src))[0]
        if os.path.dirname(src) == SM90_DIR:
            return [os.path.join("sm90", stem + ".o")]
        folder = os.path.dirname(src)
        return [os.path.join(folder, stem + ".o"), os.path.join(folder, stem + ".cuda.o")]

    def up_to_date(src):
        return any(o.endswith(tuple(os.sep + s for s in object_suffixes(src)))
                   and os.path.getmtime(o) > os.path.getmtime(src) for o in objects())

    stale = [s for s in sources if not up_to_date(s)]
    done = threading.Event()

    def loop():
        with _progress_stream() as out:
            while not done.wait(interval):
                built = sum(os.path.getmtime(o) >= start for o in objects())
                elapsed = time.time() - start
                todo = max(len(stale) - built, 0)
                if 2 * built >= len(stale):
                    left = todo * elapsed / max(built, 1)
                else:
                    left = max(_estimate_seconds(stale, jobs) - elapsed, todo * UNIT_SECONDS[".cpp"] / jobs)
                rest = f"about {left / 60:.0f} min left" if left >= 90 else "about a minute left"
                print(f"moekit build: {min(built, len(stale))}/{len(stale)} units compiled, "
                      f"{elapsed / 60:.1f} min so far, {rest}", file=out, flush=True)

    thread = threading.Thread(target=loop, daemon=True)
    if stale:
        thread.start()
    try:
        yield stale
    finally:
        done.set()
        if stale:
            thread.join()


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build, plus the sm90 objects compiled first and linked into moe._C."""

    def build_extensions(self):
        # A fixed folder in the checkout, not pip's temporary one: ninja then skips the objects
        # that are up to date when the same checkout is installed again.
        self.build_temp = os.path.join(here, "build", f"temp-{sys.implementation.cache_tag}")
        os.makedirs(self.build_temp, exist_ok=True)
        if not build_cuda:  # the CPU units take about a minute in all
            return self._build()
        units = sources + (sorted(glob.glob(os.path.join(SM90_DIR, "*.cu"))) if build_sm90 else [])
        jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
        with _report_progress(self.build_temp, units, jobs) as stale:
            cuda_units = sum(u.endswith(".cu") for u in stale)
            with _progress_stream() as out:
                print(f"moekit build: {len(stale)} units to compile ({cuda_units} CUDA), about "
                      f"{max(1, round(_estimate_seconds(stale, jobs) / 60))} min with {jobs} parallel jobs "
                      "(a CUDA unit takes about a minute of one core); a line every 30 s",
                      file=out, flush=True)
            self._build()

    def _build(self):
        if build_sm90:
            objects = _compile_sm90(self.build_temp)
            for ext in self.extensions:
                ext.extra_objects = [o for o in ext.extra_objects if not o.startswith(self.build_temp)] + objects
        super().build_extensions()


setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExt},
)
