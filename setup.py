"""barkgpt packaging.

``kernels/`` ships as ``barkgpt.kernels`` (a PyPI package named ``kernels`` exists, so the folder
must never be importable at top level). The C++ extension in ``csrc/`` is built here when torch
is importable at build time (``pip install --no-build-isolation -e .``); in pip's default
isolated build torch is absent and barkgpt compiles the extension on first use instead
(see barkgpt/_cpp.py), always against the torch that is running.
"""

import glob
import json
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    """barkgpt/_build.py, loaded by path: importing barkgpt would need torch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_barkgpt_build", os.path.join(HERE, "barkgpt", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_helpers()


def _cpp_extension():
    """(ext_modules, cmdclass) for barkgpt._C, or empty ones when torch is absent at build time."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("BARKGPT_NO_BUILD_EXT", "0") != "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # torch absent from the build env: barkgpt/_cpp.py builds on first use instead
        return [], {}

    class BuildExtensionWithRecord(BuildExtension):
        """Writes _C.build.json (torch version, source hash, CPU for native builds) beside the
        library, so barkgpt loads it only where it was built for; a failed build is skipped, not
        fatal (barkgpt then compiles on first use, or warns and runs on the torch backend).

        A wheel must run on any CPU of its platform: no -march=native. An in-place or editable
        build stays in this checkout, so it is tuned for this CPU like the JIT build (its record
        names the CPU; on another one barkgpt ignores it and compiles its own)."""

        def run(self):
            self._barkgpt_inplace = bool(self.inplace)  # setuptools clears it while building
            super().run()

        def build_extension(self, ext):
            in_tree = getattr(self, "editable_mode", False) or getattr(self, "_barkgpt_inplace", False)
            native = _build.native_flag() if in_tree or os.environ.get("BARKGPT_CPU_NATIVE", "0") == "1" else None
            if native:
                ext.extra_compile_args = {"cxx": ext.extra_compile_args["cxx"] + [native]}
            try:
                super().build_extension(ext)
            except Exception as e:
                warnings.warn(f"barkgpt: building {ext.name} failed, it will be compiled on first use "
                              f"instead: {e}")
                return
            record = {"torch": torch.__version__, "sources": _build.sources_hash(os.path.join(HERE, "csrc")),
                      "cpu": _build.cpu_hash() if native else None}
            dirs = {os.path.dirname(self.get_ext_fullpath(ext.name))}
            if in_tree:
                dirs.add(os.path.join(HERE, "barkgpt"))  # where the in-place copy of the library goes
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "_C.build.json"), "w", encoding="utf-8") as f:
                    json.dump(record, f)

    # the same flags as barkgpt/_cpp.py's JIT build (barkgpt/_build.py); -march=native is added
    # per build above
    cflags, ldflags = _build.compiler_flags(_build.uses_openmp(torch.__config__.parallel_info()),
                                            python_module=True)
    ext = CppExtension("barkgpt._C", sources, extra_compile_args={"cxx": cflags}, extra_link_args=ldflags)
    return [ext], {"build_ext": BuildExtensionWithRecord.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpp_extension()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="barkgpt",
    version="0.1.0",
    description="Train small GPT language models fast: Triton GPU and C++ CPU kernels behind a nanoGPT-style API",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # csrc/ ships as barkgpt/csrc so an installed barkgpt can JIT-build its C++ kernels.
    packages=find_packages(include=["barkgpt", "barkgpt.*"]) + ["barkgpt.kernels", "barkgpt.csrc"],
    package_dir={"barkgpt.kernels": "kernels", "barkgpt.csrc": "csrc"},
    package_data={"barkgpt.csrc": ["*.cpp", "*.h"]},
    # Minimums that are tested: triton 3.6 (the GPU machine's; benchmarks/check_triton_versions.sh)
    # and the current release; torch 2.11 (the GPU machine's, benchmarks/run_gpu.sh) and 2.13 (CI).
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        "ninja",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib>=3.5",  # loss.png of every run, sweep charts (skipped quietly if missing)
    ],
    extras_require={
        "bpe": ["tokenizers>=0.15"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib", "tokenizers>=0.15",
                 "transformers>=4.35"],
    },
    entry_points={"console_scripts": ["barkgpt=barkgpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
