"""benchmarks/run_gpu.sh's plumbing, proven on the CPU (RUN_GPU_DRY=1: CPU tensors, Triton in the
interpreter, a few tiny cases per phase): the phases run in order, results are streamed as they
are measured, and the device, versions and command are recorded (issue 19, item 6)."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "run_gpu.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path, mode, **env):
    full = dict(os.environ, RUN_GPU_DRY="1", OUT=str(tmp_path), PYTHONPATH=REPO, **env)
    full.pop("BARKGPT_BACKEND", None)
    return subprocess.run(["bash", SCRIPT, mode], cwd=REPO, env=full, capture_output=True, text=True, timeout=900)


def test_dry_run_all_phases(tmp_path):
    proc = _run(tmp_path, "all")
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["dry_run"] is True and run["command"] == "benchmarks/run_gpu.sh all"
    assert run["phases"] == {"tests": "0", "targets": "0", "rest": "0"}, run
    assert run["torch"] and run["triton"] and run["python"]
    # Each benchmark phase wrote its own report (not the git-ignored *-partial.*), with its command.
    for phase in ("targets", "rest"):
        report = json.loads((tmp_path / f"gpu-{phase}.json").read_text())
        assert report["meta"]["command"].startswith("BARKGPT_BENCH_") and "-k" in report["meta"]["command"]
        assert (tmp_path / f"gpu-{phase}.md").exists()
    # ...and every measurement was streamed as it was taken.
    lines = [json.loads(x) for x in (tmp_path / "gpu-records.jsonl").read_text().splitlines()]
    groups = {r["group"] for r in lines}
    assert {"copy", "layer_norm", "training", "embedding_add", "train_mode"} <= groups, groups
    assert all(r.get("median_s") or r.get("status") for r in lines)
    # barkgpt.train itself, eager and with cuda_graph (refused without CUDA, and recorded so)
    modes = {r["provider"]: r for r in lines if r["group"] == "train_mode"}
    assert modes["eager"]["status"] == "ok" and modes["eager"]["steps_per_s"] > 0
    assert modes["cuda-graph"]["status"].startswith("refused: cuda_graph (--cuda-graph) cannot run here")
    assert (tmp_path / "gpu-tests.log").exists()


def test_budget_spent_skips_a_phase_and_says_so(tmp_path):
    proc = _run(tmp_path, "targets", RUN_GPU_BUDGET_S="30")
    assert proc.returncode == 1
    assert "skipped (run" in proc.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["phases"] == {"targets": "skipped"}
