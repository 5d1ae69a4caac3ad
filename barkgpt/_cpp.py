"""The ``"cpp"`` backend: C++ CPU kernels from ``csrc/``, registered as ``barkgpt_cpp::*`` ops.

Importing this module loads the kernels or raises (barkgpt.ops then records the reason, warns
once and uses the torch backend). Where the compiled library comes from, first match wins:

1. ``barkgpt._C`` built by setup.py, only if its build record says it was compiled against the
   running torch from the sources shipped beside it;
2. a JIT build (``torch.utils.cpp_extension.load``, ninja) in a cache directory keyed by the
   torch version, Python, compiler flags, CPU and a hash of the sources, so a build for
   another torch is never loaded. It is compiled once, under a file lock so parallel
   processes do not race, with a one-line message on stderr.

``BARKGPT_NO_CPP=1`` disables the backend; ``BARKGPT_CACHE_DIR`` moves the build cache. A library
is loaded only from a directory no other user can write (barkgpt/_cache_dir.py): anything else is
refused with the reason, and barkgpt runs on the torch backend.
C++ registers only schemas and CPU kernels; this module registers them against the op
declarations (barkgpt/opdecls.py) with ``registry.register_kernels``, which adds the fake (meta)
kernels and the autograd formulas with ``torch.library``, so ``torch.compile(fullgraph=True)``
sees each op as one node and ``torch.library.opcheck`` passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import stat
import sys
from typing import List, Optional, Tuple

import torch

from . import _build, _cache_dir, opdecls
from ._build import source_files, sources_hash
from .registry import implementation, register_impl, register_kernels

__all__ = ["layer_norm", "attention", "embedding_add", "linear_cross_entropy", "cached_attention",
           "unavailable_reason", "LIBRARY", "BUILD"]

_NS = "barkgpt_cpp"
_HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_RECORD = "_C.build.json"  # written by setup.py beside the prebuilt barkgpt._C


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# ---- finding and building the library ------------------------------------------------------

def source_dir() -> Optional[str]:
    """csrc/ of an installed package (barkgpt/csrc) or of a source checkout (../csrc)."""
    for d in (os.path.join(_HERE, "csrc"), os.path.join(os.path.dirname(_HERE), "csrc")):
        if os.path.isfile(os.path.join(d, "ops.cpp")):
            return d
    return None


def _uses_openmp() -> bool:
    try:
        return _build.uses_openmp(torch.__config__.parallel_info())
    except Exception:  # pragma: no cover - very old torch
        return True


def _jit_flags() -> Tuple[List[str], List[str]]:
    # Built on (and for) the machine that runs it, so it may use every instruction this CPU has.
    native = None if _truthy("BARKGPT_CPP_PORTABLE") else _build.native_flag()
    return _build.compiler_flags(_uses_openmp(), native)


def _cache_root() -> str:
    # Created 0700 and checked private (owner, modes, parents); raises UnsafeCacheDir if not.
    return _cache_dir.cache_root()


class _NoCudaHomeNotice:
    """Drops torch's import-time "No CUDA runtime is found, using CUDA_HOME=..." warning: on a
    CPU machine with a CUDA build of torch it says nothing about building CPU kernels."""

    def filter(self, record) -> bool:
        return "No CUDA runtime is found" not in str(record.msg)


def _cpp_extension():
    """torch.utils.cpp_extension, imported only when a build is needed (its import probes for
    CUDA and logs about it), without that notice."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    notice = _NoCudaHomeNotice()
    logger.addFilter(notice)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(notice)
    return cpp_extension


def _compiler_problem() -> Optional[str]:
    cxx = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler found (looked for {cxx!r}; install one, or set CXX)"
    cpp_extension = _cpp_extension()
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        try:  # the pip 'ninja' package (a dependency of barkgpt) may not be on PATH
            import ninja  # noqa: F401
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            cpp_extension.verify_ninja_availability()
        except Exception:
            return "ninja is not available (pip install ninja)"
    return None


class _FileLock:
    """An exclusive lock held while building; the OS drops it if the process dies."""

    def __init__(self, path: str):
        self.path, self.fh = path, None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            import fcntl
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: torch's own build lock still applies
            pass
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _short_build_error(text: str, log_path: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("FAILED", "c++ ", "g++ "))]
    detail = "; ".join((errors or lines[-3:])[:3])
    return f"compiling csrc/ failed: {detail[:600]} (full log: {log_path})"


def _jit_build(src: str) -> str:
    """Path of the JIT-built library for this torch/Python/CPU/sources, compiling it if needed."""
    cflags, ldflags = _jit_flags()
    key_parts = [torch.__version__, sys.version.split()[0], sys.platform, platform.machine(),
                 " ".join(cflags + ldflags), sources_hash(src)]
    if any("native" in f for f in cflags):
        key_parts.append(_build.cpu_id())
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    name = f"barkgpt_cpp_{key}"
    root = _cache_root()
    build_dir = os.path.join(root, f"torch-{torch.__version__}-{key}")
    ext = ".pyd" if os.name == "nt" else ".so"  # cpp_extension.LIB_EXT, without importing it
    lib = os.path.join(build_dir, name + ext)
    # The linker writes the library in place, so its mere existence does not mean it is whole:
    # a marker written after a finished build (under the lock) is what says it may be loaded.
    done = lib + ".done"
    if os.path.isfile(done) and os.path.isfile(lib):
        return _cache_dir.check_library(lib)
    problem = _compiler_problem()
    if problem is not None:
        raise ImportError(problem)
    _cache_dir.private_dir(build_dir)
    with _FileLock(os.path.join(root, name + ".lock")):
        if os.path.isfile(done) and os.path.isfile(lib):  # another process built it meanwhile
            return _cache_dir.check_library(lib)
        stale = os.path.join(build_dir, "lock")  # torch's own build marker, left by a killed build
        if os.path.exists(stale):
            os.remove(stale)
        cpp_extension = _cpp_extension()
        sys.stderr.write(f"barkgpt: compiling the C++ CPU kernels for torch {torch.__version__} "
                         f"(once, about a minute) in {build_dir}\n")
        sys.stderr.flush()
        try:
            cpp_extension.load(name=name, sources=[f for f in source_files(src) if f.endswith(".cpp")],
                               extra_cflags=cflags, extra_ldflags=ldflags, build_directory=build_dir,
                               is_python_module=False, verbose=False)
        except Exception as e:  # compiler errors, missing headers, link failures
            log = os.path.join(build_dir, "build.log")
            with open(log, "w", encoding="utf-8") as f:
                f.write(str(e))
            raise ImportError(_short_build_error(str(e), log)) from None
        if not os.path.isfile(lib):
            raise ImportError(f"the C++ build finished but {lib} is missing")
        os.chmod(lib, stat.S_IMODE(os.stat(lib).st_mode) & ~0o022)  # a umask of 002 made it group-writable
        with open(done, "w", encoding="utf-8") as f:
            f.write(torch.__version__ + "\n")
    return _cache_dir.check_library(lib)


def _prebuilt(src: Optional[str]) -> Optional[str]:
    """barkgpt._C from setup.py, if it was built for the running torch and these sources."""
    try:
        spec = importlib.util.find_spec("barkgpt._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), BUILD_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # no record: built by something we cannot vouch for
    if record.get("torch") != torch.__version__:
        return None
    if src is not None and record.get("sources") != sources_hash(src):
        return None  # csrc/ changed since setup.py built it (editable checkout)
    cpu = record.get("cpu")
    if cpu is not None and cpu != _build.cpu_hash():
        return None  # tuned (-march=native) for another CPU
    # Installed beside barkgpt's Python code: trusted as far as that code is (its owner, root),
    # provided no one else can write it. Otherwise build our own instead.
    try:
        return _cache_dir.check_library(spec.origin, owners=(0, os.stat(_HERE).st_uid))
    except _cache_dir.UnsafeCacheDir as e:
        sys.stderr.write(f"barkgpt: not loading the prebuilt barkgpt._C: {e}\n")
        return None


def _op_registered(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::{name}", "CPU")
    except Exception:
        return False


def _load_library() -> Tuple[str, str]:
    """Load the compiled kernels; returns (path, how) or raises ImportError with the reason."""
    if _truthy("BARKGPT_NO_CPP"):
        raise ImportError("disabled by the environment variable BARKGPT_NO_CPP")
    if _op_registered("attention_fwd"):  # already loaded in this process (module re-import)
        return "<already loaded>", "loaded"
    src = source_dir()
    path, how = _prebuilt(src), "prebuilt"
    if path is None:
        if src is None:
            raise ImportError("the C++ sources (csrc/) were not found next to barkgpt and no "
                              "prebuilt barkgpt._C matches this torch; reinstall barkgpt")
        path, how = _jit_build(src), "jit"
    try:
        torch.ops.load_library(path)
    except Exception as e:
        raise ImportError(f"loading {path} failed: {e}") from None
    info = torch.ops.barkgpt_cpp.build_info()
    if info != "torch " + ".".join(torch.__version__.split("+")[0].split(".")[:3]):
        raise ImportError(f"{path} was compiled against {info}, but torch {torch.__version__} is running")
    return path, how


LIBRARY, BUILD = _load_library()
_ops = torch.ops.barkgpt_cpp
# What barkgpt.ops warns about once it has loaded this backend (None: nothing). C++ parses
# BARKGPT_CPU_CACHE_MB while the library loads, where a warning would bypass Python's.
LOAD_WARNING: Optional[str] = _ops.output_cache_env_problem() or None

GEMM_CHOICES = ("auto", "onednn", "aten")


def _apply_gemm_env() -> Optional[str]:
    """Apply BARKGPT_CPU_GEMM (csrc/gemm.h: where the kernels' fp32 products go); returns why it
    was ignored, or None."""
    choice = os.environ.get("BARKGPT_CPU_GEMM", "").strip().lower()
    if not choice:
        return None
    if choice not in GEMM_CHOICES:
        return (f"BARKGPT_CPU_GEMM={choice!r} ignored: use one of {', '.join(GEMM_CHOICES)}; "
                f"the cpp kernels use {_ops.gemm_library()}")
    try:
        _ops.gemm_set_library(choice)
    except RuntimeError as e:
        return f"BARKGPT_CPU_GEMM={choice!r} ignored ({str(e).splitlines()[0]}); the cpp kernels use {_ops.gemm_library()}"
    return None


_gemm_problem = _apply_gemm_env()
if _gemm_problem:
    LOAD_WARNING = f"{LOAD_WARNING}; {_gemm_problem}" if LOAD_WARNING else _gemm_problem


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type == "cpu":
        return None
    return f"the cpp backend runs on CPU tensors only, not {device_type}"


# ---- registrations: the declared ops' kernels (barkgpt/opdecls.py has shapes and formulas) -------
#
# Two routes to the same kernels. Under torch.compile: the kernel ops *_fwd/*_bwd, whose fake
# kernels and autograd are wired from the declarations by registry.register_kernels, so the
# graph holds *_fwd/*_bwd nodes and runs no Python autograd at all. In eager mode:
# barkgpt_cpp::layer_norm/attention/embedding_add, whose autograd is C++ (csrc/autograd.cpp) and
# calls the same kernel ops; the Python autograd layer would add ~15 us per op, as much as the
# kernels take at the presets' sizes (benchmarks/test_bench_autograd.py measures it).
# tests/test_ops.py checks that route against the declaration's, bitwise.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _register() -> None:
    # op declaration -> argument adaptation before the kernels (None: none). Out-of-range ids
    # raise IndexError inside the C++ embedding kernel (same message as check_token_ids),
    # compiled or not, before any table row is read.
    kernels = [(opdecls.LAYER_NORM, None), (opdecls.ATTENTION, None), (opdecls.EMBEDDING_ADD, opdecls.promote_tables),
               (opdecls.CACHED_ATTENTION, None), (opdecls.LINEAR, None)]
    for decl, prepare in kernels:
        has_bwd = decl.backward is not None
        eager = getattr(_ops, decl.name).default if _op_registered(decl.name) else None
        register_kernels(decl, "cpp", _NS, f"{_NS}::{decl.name}_fwd", f"{_NS}::{decl.name}_bwd" if has_bwd else None,
                         dtypes=_DTYPES, eager=eager, prepare=prepare)


_register()


# linear_cross_entropy: the declared kernels (linear_cross_entropy_fwd/_bwd) under torch.compile;
# eager calls go through opdecls.linear_cross_entropy_eager on linear_cross_entropy_fwd_ex, which
# skips the gradient work under no_grad and the scaling copy for an upstream gradient of 1. The
# C++ kernel checks the targets itself (IndexError), compiled or not.
def _lce_ex_fake(x, weight, targets, bias, ignore_index, reduction, compute_grad, chunk_rows):
    loss, dx, dw, db = opdecls.LINEAR_CROSS_ENTROPY.fake(x, weight, targets, bias, ignore_index, reduction)
    if not compute_grad:
        return loss, x.new_empty((0,)), weight.new_empty((0,)), db.new_empty((0,))
    return loss, dx, dw, db


if not getattr(_ops, "_barkgpt_lce_fake", False):  # registrations live as long as the process
    torch.library.register_fake(f"{_NS}::linear_cross_entropy_fwd_ex", _lce_ex_fake)
    _ops._barkgpt_lce_fake = True
_lce_kernel = _ops.linear_cross_entropy_fwd_ex.default


# decode_layers (csrc/decode.cpp, barkgpt.ops.decode_layers): inference only, no autograd; its
# output has x's shape and dtype (the caches are written in place, as the schema says).
def _decode_layers_fake(x, weights, k_cache, v_cache, start, offset, n_head, bias, norm_first, activation, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# decode_step: the same from token ids (B, T) to ln_f of the last position (B, 1, C).
def _decode_step_fake(idx, tok_emb, pos_emb, weights, k_cache, v_cache, start, offset, n_head, bias, norm_first,
                      activation, eps, ln_f_weight, ln_f_bias):
    return tok_emb.new_empty((idx.shape[0], 1, tok_emb.shape[1]))


if not getattr(_ops, "_barkgpt_decode_fake", False):
    torch.library.register_fake(f"{_NS}::decode_layers", _decode_layers_fake)
    torch.library.register_fake(f"{_NS}::decode_step", _decode_step_fake)
    _ops._barkgpt_decode_fake = True


# head_screen (csrc/head_screen.cpp, barkgpt.ops.head_topk_logits): inference only.
def _head_screen_fake(x, w, factor, xnorm, abs_err, scale=None):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], w.shape[0]))


def _head_screen_topk_fake(x, weight, w, scale, factor, max_norm, abs_err, k, max_count):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((2,), dtype=torch.int64)


def _head_screen_prepare_fake(w, hugepages):
    return w.new_empty(w.shape, dtype=torch.float16), w.new_empty((w.shape[0], 3), dtype=torch.float64)


def _head_screen_prepare_int8_fake(w, hugepages):
    return (w.new_empty(w.shape, dtype=torch.int8), w.new_empty((w.shape[0],)),
            w.new_empty((w.shape[0], 4), dtype=torch.float64))


if not getattr(_ops, "_barkgpt_head_screen_fake", False):
    torch.library.register_fake(f"{_NS}::head_screen", _head_screen_fake)
    torch.library.register_fake(f"{_NS}::head_screen_topk", _head_screen_topk_fake)
    torch.library.register_fake(f"{_NS}::head_screen_prepare", _head_screen_prepare_fake)
    torch.library.register_fake(f"{_NS}::head_screen_prepare_int8", _head_screen_prepare_int8_fake)
    _ops._barkgpt_head_screen_fake = True


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int = 0) -> torch.Tensor:
    """The cpp backend's linear_cross_entropy; ``chunk_rows`` > 0 sets the rows per chunk (tests)."""
    if torch.compiler.is_compiling():
        return _lce_declared(x, weight, targets, bias, ignore_index, reduction)
    return opdecls.linear_cross_entropy_eager(_lce_kernel, x, weight, targets, bias, ignore_index,
                                              reduction, chunk_rows)


_lce_impl = register_kernels(opdecls.LINEAR_CROSS_ENTROPY, "cpp", _NS, f"{_NS}::linear_cross_entropy_fwd",
                             f"{_NS}::linear_cross_entropy_bwd", dtypes=_DTYPES)
_lce_declared = _lce_impl.call
register_impl(dataclasses.replace(_lce_impl, call=linear_cross_entropy))

# The backend's ops as plain functions (ops.py has validated shapes, devices and dtypes).
layer_norm = implementation("layer_norm", "cpp").call
attention = implementation("attention", "cpp").call
embedding_add = implementation("embedding_add", "cpp").call
cached_attention = implementation("cached_attention", "cpp").call
linear = implementation("linear", "cpp").call
