"""Importing Hugging Face transformers in the test process without it importing barkgpt's kernels/
folder a second time.

transformers probes for the PyPI package ``kernels``: ``find_spec("kernels")`` and, without package
metadata, ``import kernels``. Run from the repository (``python -m pytest`` puts the working
directory on sys.path), that finds the repository's ``kernels/`` folder, whose modules then load a
second time as top-level ``kernels.*`` and take over the Triton op registrations, so that patches
of ``barkgpt.kernels`` no longer reach the kernels that run.
"""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the Hub: every model in these tests is built locally
    if "kernels" not in sys.modules:
        spec = importlib.util.find_spec("kernels")
        if spec is not None and spec.origin and os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))) == REPO:
            sys.modules["kernels"] = None  # hides only the checkout's folder: a real `kernels` package stays visible
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def repo_kernels_imported_twice() -> bool:
    mod = sys.modules.get("kernels")
    return mod is not None and os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__ or ""))) == REPO
