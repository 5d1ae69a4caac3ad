"""Security and fault findings outside the training loop (issue 18, items 1-3, 7-9, 11, 13-15).

Each test reproduces one finding: it fails on the code before its fix.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch

import barkgpt
from barkgpt import CheckpointError, ConfigError, GPTConfig, ops
from barkgpt import checkpoint as ckpt
from helpers import REPO, run_python

CPP_DISABLED = os.environ.get("BARKGPT_NO_CPP", "") not in ("", "0")


# ---- item 9: the raw C++ backward ops check the shapes of every tensor they read -------------

def _cpp_ops():
    if CPP_DISABLED:
        pytest.skip("BARKGPT_NO_CPP is set: the cpp backend is disabled on purpose")
    import barkgpt._cpp  # noqa: F401  (builds the extension on first use; a failure is an error)
    return torch.ops.barkgpt_cpp


def _ln_args(rows=6, n=40):
    x = torch.randn(rows, n)
    w, b = torch.randn(n), torch.randn(n)
    _, mean, rstd = _cpp_ops().layer_norm_fwd(x, w, b, 1e-5)
    return [torch.randn(rows, n), x, w, b, mean, rstd]


@pytest.mark.parametrize("which, bad", [
    (4, torch.zeros(2)),            # mean shorter than the rows
    (5, torch.zeros(2)),            # rstd shorter than the rows
    (4, torch.zeros(6, 1)),         # mean of the right size, wrong shape
    (2, torch.zeros(3)),            # weight shorter than a row
    (3, torch.zeros(3)),            # bias shorter than a row
    (2, torch.zeros(40, 2)),        # weight 2-D
])
def test_cpp_layer_norm_bwd_checks_its_arguments(which, bad):
    args = _ln_args()
    args[which] = bad
    with pytest.raises(RuntimeError, match="layer_norm backward: (mean|weight|bias)"):
        _cpp_ops().layer_norm_bwd(*args)


def test_cpp_layer_norm_bwd_accepts_its_own_forward():
    args = _ln_args()
    dx, dw, db = _cpp_ops().layer_norm_bwd(*args)
    assert dx.shape == args[1].shape and dw.shape == db.shape == (40,)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("lse_shape", [(1, 2, 3), (1, 2), (2, 2, 17), (1, 2, 17, 1), (34,)])
def test_cpp_attention_bwd_checks_lse(lse_shape):
    q, k, v = (torch.randn(1, 2, 17, 8) for _ in range(3))
    out, lse = _cpp_ops().attention_fwd(q, k, v, True)
    with pytest.raises(RuntimeError, match=r"attention backward: lse must have shape \(B, H, T\)"):
        _cpp_ops().attention_bwd(torch.randn_like(out), q, k, v, out, torch.zeros(lse_shape), True)


def test_cpp_attention_bwd_names_bad_grad_shape():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, lse = _cpp_ops().attention_fwd(q, k, v, True)
    with pytest.raises(RuntimeError, match="grad and out must have q's shape"):
        _cpp_ops().attention_bwd(torch.randn(1, 2, 4, 8), q, k, v, out, lse, True)


@pytest.mark.parametrize("vocab, positions", [(-3, 8), (10, -1)])
def test_cpp_embedding_bwd_checks_sizes(vocab, positions):
    grad, idx = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="vocab_size and num_positions must be >= 0"):
        _cpp_ops().embedding_add_bwd(grad, idx, vocab, positions)


# ---- checkpoints: helpers ------------------------------------------------------------------------

def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return barkgpt.BarkGPT(GPTConfig.preset("bark", **overrides), backend="torch")


def _rewrite(directory, name, data, manifest=None):
    """What an attacker (or a crafted download) can do: change a file and the manifest with it."""
    directory = str(directory)
    if data is not None:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    mpath = os.path.join(directory, ckpt.MANIFEST_FILE)
    with open(mpath) as f:
        m = json.load(f)
    if manifest is not None:
        m["sha256"] = manifest
    elif data is not None:
        import hashlib
        m["sha256"][name] = hashlib.sha256(data).hexdigest()
    with open(mpath, "w") as f:
        json.dump(m, f)


def _config_bytes(**changes):
    d = GPTConfig.preset("bark").to_dict()
    d.update(changes)
    return json.dumps(d).encode()


# ---- item 13: a path is a path, even when it starts with "{" ------------------------------------

def test_a_run_under_a_brace_directory_loads(tmp_path):
    d = tmp_path / "{runs}" / "a"
    model = _tiny()
    model.save(str(d))
    assert GPTConfig.from_json(str(d / "config.json")) == model.config
    assert GPTConfig.from_json_file(str(d / "config.json")) == model.config
    torch.testing.assert_close(barkgpt.load(str(d)).token_emb.weight, model.token_emb.weight)


def test_json_text_and_path_are_separate():
    c = GPTConfig.preset("bark")
    assert GPTConfig.from_json_text(c.to_json()) == c
    with pytest.raises(ConfigError, match="does not exist"):
        GPTConfig.from_json_file(c.to_json())  # text given as a path is a missing file
    with pytest.raises(ConfigError, match="if '{runs}/x.json' is meant as a file path, it does not exist"):
        GPTConfig.from_json("{runs}/x.json")
