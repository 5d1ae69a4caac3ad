"""barkgpt packaging.

``kernels/`` ships as ``barkgpt.kernels`` (a PyPI package named ``kernels`` exists, so the folder
must never be importable at top level). The C++ extension in ``csrc/`` is built here when torch
is importable at build time (``pip install --no-build-isolation -e .``); in pip's default
isolated build torch is absent and barkgpt compiles the extension on first use instead
(see barkgpt/_cpp.py), always against the torch that is running.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("BARKGPT_NO_BUILD_EXT", "0") == "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # torch absent from the build env: build on first use instead
        pass
    else:
        ext_modules = [CppExtension("barkgpt._C", sources,
                                    extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                                    extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="barkgpt",
    version="0.1.0",
    description="Train small GPT language models fast: Triton GPU and C++ CPU kernels behind a nanoGPT-style API",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["barkgpt", "barkgpt.*"]) + ["barkgpt.kernels"],
    package_dir={"barkgpt.kernels": "kernels"},
    package_data={"barkgpt": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        "ninja",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib"],
    },
    entry_points={"console_scripts": ["barkgpt=barkgpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
