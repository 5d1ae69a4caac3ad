"""What identifies a build of the C++ kernels and the flags it is compiled with, shared by setup.py
and barkgpt/_cpp.py.

Standard library only: setup.py loads this file by path before torch (or barkgpt) can be
imported, and the build record it writes must match what barkgpt/_cpp.py computes at run time.
"""

import glob
import hashlib
import os
import platform
from typing import List, Optional, Tuple


def source_files(src: str) -> List[str]:
    """csrc/*.cpp and *.h, sorted."""
    return sorted(glob.glob(os.path.join(src, "*.cpp")) + glob.glob(os.path.join(src, "*.h")))


def sources_hash(src: str) -> str:
    """sha256 over the names and contents of csrc/*.cpp and *.h."""
    h = hashlib.sha256()
    for f in source_files(src):
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def cpu_id() -> str:
    """Which CPU a -march=native build is for (a shared cache, an in-place setup.py build)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def cpu_hash() -> str:
    return hashlib.sha256(cpu_id().encode()).hexdigest()


def native_flag() -> Optional[str]:
    """The compiler flag that tunes for this CPU (gcc/clang), or None where there is none."""
    if os.name == "nt":
        return None
    machine = platform.machine().lower()
    return {"x86_64": "-march=native", "amd64": "-march=native", "aarch64": "-mcpu=native",
            "arm64": "-mcpu=native"}.get(machine)


def uses_openmp(parallel_info: str) -> bool:
    """Whether torch (``torch.__config__.parallel_info()``) runs ATen's parallel_for on OpenMP:
    it is header-inline, so the kernels then need -fopenmp."""
    return "parallel backend: OpenMP" in parallel_info


def compiler_flags(openmp: bool, native: Optional[str] = None,
                   python_module: bool = False) -> Tuple[List[str], List[str]]:
    """(compile flags, link flags) for csrc/. ``native``: the CPU-tuning flag (native_flag()) or
    None for a portable build; ``python_module``: setup.py's barkgpt._C (a module init symbol)."""
    if os.name == "nt":
        return ["/O2", "/openmp"] + (["/DBARKGPT_PYTHON_MODULE"] if python_module else []), []
    cflags = ["-O3", "-fno-math-errno"] + (["-DBARKGPT_PYTHON_MODULE"] if python_module else [])
    if native:
        cflags.append(native)
    if openmp:
        return cflags + ["-fopenmp"], ["-fopenmp"]
    return cflags, []
