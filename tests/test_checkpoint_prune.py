"""Pruning old checkpoints survives a kill in the middle of deleting one."""

import os
import shutil

import pytest

import barkgpt
from barkgpt import checkpoint as ckpt
from barkgpt.config import GPTConfig


class Killed(BaseException):
    pass


def test_a_kill_while_pruning_never_leaves_a_listed_half_deleted_checkpoint(tmp_path, monkeypatch):
    m = barkgpt.BarkGPT(GPTConfig.preset("bark-tiny"), backend="torch")
    opt = m.configure_optimizers()
    out = str(tmp_path)
    for step in (1, 2):
        ckpt.save_training_checkpoint(out, step, m, opt, {"x": 1}, {}, keep_last=2)

    real_rmtree = shutil.rmtree

    def dies_midway(path, ignore_errors=False, onerror=None, **kw):
        # delete one file of the tree, then the process "dies" (as SIGKILL would, mid-delete)
        for dirpath, _, files in os.walk(path):
            for f in files:
                if f.endswith(".safetensors"):
                    os.remove(os.path.join(dirpath, f))
                    raise Killed
        return real_rmtree(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_midway)
    with pytest.raises(Killed):  # saving step 3 prunes step 1
        ckpt.save_training_checkpoint(out, 3, m, opt, {"x": 1}, {}, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    listed = ckpt.list_checkpoints(out)
    assert [s for s, _ in listed] == [2, 3]
    for _, path in listed:  # every listed checkpoint is whole
        ckpt.load_training_checkpoint(path)
    # the leftover is cleaned up by the next save
    ckpt.save_training_checkpoint(out, 4, m, opt, {"x": 1}, {}, keep_last=2)
    assert [n for n in os.listdir(os.path.join(out, ckpt.CKPT_DIR)) if n.startswith(".tmp-")] == []
