"""Build of icd_fast's C++ (and, where possible, CUDA) operator library.

Environment switches:
  ICD_FAST_BUILD_CUDA   auto (default): build the CUDA kernels when nvcc and a CUDA build of
                        torch are both present; 1: require them (fail otherwise); 0: CPU only.
  TORCH_CUDA_ARCH_LIST  the GPU architectures to compile for. When unset and no GPU is
                        visible (torch cannot ask one), defaults to "8.0;9.0".
  MAX_JOBS              parallel compile jobs (read by torch's ninja build).
  ICD_FAST_DEBUG        1: -O0 -g instead of -O3.
"""
import glob
import os
import re
import shutil
import subprocess


def toolkit_root_from_nvcc():
    """The CUDA toolkit that the nvcc on PATH belongs to, even when that nvcc is a wrapper
    script outside the toolkit (torch would then guess CUDA_HOME from the wrapper's folder
    and miss the toolkit's libraries)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


# Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _root = toolkit_root_from_nvcc()
    if _root:
        os.environ["CUDA_HOME"] = _root

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_build_requested() -> bool:
    mode = os.environ.get("ICD_FAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "1", "0"}:
        raise ValueError(f"ICD_FAST_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    can_build = CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not can_build:
        raise RuntimeError(
            "ICD_FAST_BUILD_CUDA=1 but the CUDA build is impossible: "
            f"nvcc found at {CUDA_HOME!r}, torch built with CUDA {torch.version.cuda!r}"
        )
    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return mode != "0" and can_build and has_sources


def extension():
    debug = os.environ.get("ICD_FAST_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it runs serially.
    cxx = opt + ["-fopenmp"]
    define_macros = []
    if not cuda_build_requested():
        return CppExtension("icd_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros += [("ICD_FAST_WITH_CUDA", None), ("ICD_FAST_CUDA_ARCHS", f'"{archs}"')]
    # -Xptxas -v prints registers and spills per kernel into the build log.
    nvcc = opt + ["-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "icd_fast._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
