"""barkgpt.sweep / `barkgpt sweep`: planning and its errors, results and charts, restarts after a
kill, concurrent processes, and the power-law fit."""

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import barkgpt
from barkgpt import SweepError, cli
from barkgpt.data import BarkCorpus

from helpers import REPO

sw = importlib.import_module("barkgpt.sweep")  # the module: barkgpt.sweep is the function

GRID = {"n_layer": [1, 2], "n_embd": [16, 32]}
TRAIN = {"batch_size": 8}
QUIET = dict(backend="torch", progress=False)


def _quiet_log(lines):
    return lines.append


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-run sweep of 8 steps each on the bark corpus, and its log."""
    out = str(tmp_path_factory.mktemp("sweep") / "s")
    log = []
    res = barkgpt.sweep(out, grid=GRID, steps=8, train_settings=TRAIN, log=log.append, **QUIET)
    return out, res, log


# ---- a tiny sweep end to end ---------------------------------------------------------------------

def test_tiny_sweep_writes_tables_and_charts(tiny):
    out, res, log = tiny
    assert [r["name"] for r in res.runs] == ["000-n_layer=1-n_embd=16", "001-n_layer=1-n_embd=32",
                                             "002-n_layer=2-n_embd=16", "003-n_layer=2-n_embd=32"]
    assert res.pending == []
    for key in ("md", "csv", "json", "loss_vs_params", "loss_vs_compute", "loss_curves"):
        assert os.path.getsize(res.files[key]) > 0, key
    for png in ("loss_vs_params", "loss_vs_compute", "loss_curves"):
        with open(res.files[png], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(res.files["md"]).read()
    for head in ("run", "params", "non-emb params", "train FLOPs", "tokens", "wall", "tokens/s",
                 "MFU (measured peak)", "final val loss", "best val loss", "gap to optimum"):
        assert f"| {head} |" in md or f"| {head}" in md, head
    assert "L = " in md and "warning" in md  # 4 points: the fit is printed, with its caveat
    optimum = BarkCorpus().optimal_loss(BarkCorpus().val)
    for r in res.runs:
        assert f"| {r['name']} |" in md
        assert r["steps"] == 8 and r["tokens"] == 8 * 8 * 32
        assert r["train_flops"] == r["flops_per_token"] * r["tokens"]
        assert r["optimal_loss"] == pytest.approx(optimum)
        assert r["gap_to_optimum"] == pytest.approx(r["final_val_loss"] / optimum - 1)
        assert r["wall_sec"] > 0 and r["tokens_per_sec"] == pytest.approx(r["tokens"] / r["wall_sec"])
        assert r["peak_source"] == "measured" and 0 < r["mfu"] < 1
        # each run is an ordinary run directory: it loads, and its metrics are the run's
        d = os.path.join(out, r["dir"])
        m = barkgpt.load(d)
        assert (m.config.n_layer, m.config.n_embd) == (r["settings"]["n_layer"], r["settings"]["n_embd"])
        assert m.num_params() == r["params"]
        assert os.path.exists(os.path.join(d, "loss.png"))
        vals = [json.loads(x)["val_loss"] for x in open(os.path.join(d, "metrics.jsonl")) if "val_loss" in x]
        assert vals[-1] == r["final_val_loss"] and min(vals) == r["best_val_loss"]
    rows = list(csv.DictReader(open(res.files["csv"])))
    assert [int(x["n_layer"]) for x in rows] == [1, 1, 2, 2] and [int(x["n_embd"]) for x in rows] == [16, 32, 16, 32]
    assert float(rows[3]["final_val_loss"]) == res.runs[3]["final_val_loss"]
    data = json.load(open(res.files["json"]))
    assert data["fit_params"]["n"] == 4 and data["mfu_peak_source"] == ["measured"]


def test_text_sweep_reports_bits_per_byte(tmp_path):
    # a byte-level text corpus: results.md/.csv/.json give each run's final bits per byte (the
    # bark corpus is no text: the tiny sweep above has no such column)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 400)
    res = barkgpt.sweep(str(tmp_path / "s"), grid={"n_embd": [16, 32]}, data=str(text), preset="small",
                        steps=3, train_settings={"batch_size": 2}, log=lambda m: None, **QUIET)
    md = open(res.files["md"]).read()
    assert "| final val bits/byte |" in md
    for r in res.runs:
        d = os.path.join(str(tmp_path / "s"), r["dir"])
        bpb = [json.loads(x)["val_bpb"] for x in open(os.path.join(d, "metrics.jsonl")) if "val_bpb" in x]
        assert r["final_val_bpb"] == bpb[-1] > 0
        assert f"{r['final_val_bpb']:.4f}" in md
    rows = list(csv.DictReader(open(res.files["csv"])))
    assert [float(x["final_val_bpb"]) for x in rows] == [r["final_val_bpb"] for r in res.runs]


def test_tiny_sweep_reports_progress_and_eta(tiny):
    _, _, log = tiny
    starts = [m for m in log if m.startswith("sweep: run ")]
    assert [m.split()[2] for m in starts] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("ETA" in m for m in starts[1:])  # from the second run on, there is a rate to go by
    assert sum(m.startswith("sweep: finished ") for m in log) == 4


def test_rerun_skips_finished_runs_and_list_shows_them(tiny, capsys):
    out, res, _ = tiny
    before = {r["name"]: os.path.getmtime(os.path.join(out, r["dir"], "metrics.jsonl")) for r in res.runs}
    log = []
    again = barkgpt.sweep(out, log=log.append, **QUIET)  # no grid: the sweep already in out
    assert not any(m.startswith("sweep: run ") for m in log)
    assert "4 of 4 selected already done" in log[0]
    assert {r["name"]: os.path.getmtime(os.path.join(out, r["dir"], "metrics.jsonl")) for r in again.runs} == before
    assert cli.main(["sweep", "--out", out, "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(" done " in ln for ln in lines)
    assert lines[2].split()[:3] == ["2", "done", "002-n_layer=2-n_embd=16"]


def test_only_trains_the_chosen_run(tmp_path, capsys):
    out = str(tmp_path / "s")
    args = ["sweep", "--out", out, "--grid", "n_embd=16,32", "n_layer=1", "--steps", "3", "--batch-size", "4",
            "--backend", "torch", "--no-progress"]
    assert cli.main(args + ["--list"]) == 0  # the plan of a new sweep: nothing written
    assert "pending" in capsys.readouterr().out and not os.path.exists(out)
    assert cli.main(args + ["--only", "1"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "results.md")
    assert cli.main(["sweep", "--out", out, "--list"]) == 0
    listing = capsys.readouterr().out.split("\n")
    assert " pending " in listing[0] and " done " in listing[1]
    md = open(os.path.join(out, "results.md")).read()
    assert "Not finished (1): `000-n_embd=16-n_layer=1`" in md


# ---- restart after a kill, and concurrent processes --------------------------------------------------

KILL_SWEEP = """
import os, signal, sys
import barkgpt
def kill(run, step, loss):
    if run.index == 1 and step == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as a crash or `kill -9`
barkgpt.sweep(sys.argv[1], grid={{"n_embd": [16, 32, 24]}}, steps=10, preset="bark",
              train_settings={{"batch_size": 8, "save_every": 5, "eval_every": 5}},
              backend="torch", progress=False, on_step=kill if sys.argv[2] == "kill" else None)
"""


def _run_script(code, *args, timeout=600):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def _weights(d):
    return barkgpt.load(d).state_dict()


def test_killed_sweep_restarts_skipping_finished_runs_and_resumes_bitwise(tmp_path):
    out = str(tmp_path / "s")
    p = _run_script(KILL_SWEEP.format(), out, "kill")
    assert p.returncode == -9, p.stderr
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert runs == ["000-n_embd=16", "001-n_embd=32"]  # the third never started
    first = os.path.join(out, "runs", runs[0])
    done_record = open(os.path.join(first, sw.RESULT_FILE)).read()
    first_metrics = open(os.path.join(first, "metrics.jsonl")).read()
    assert not os.path.exists(os.path.join(out, "runs", runs[1], sw.RESULT_FILE))
    assert [s for s, _ in barkgpt.checkpoint.list_checkpoints(os.path.join(out, "runs", runs[1]))] == [5]

    p = _run_script(KILL_SWEEP.format(), out, "restart")
    assert p.returncode == 0, p.stderr
    assert "1 of 3 selected already done" in p.stderr
    assert "sweep: run 2/3 001-n_embd=32" in p.stderr and "resuming at step 5" in p.stderr
    assert "run 1/3" not in p.stderr  # the finished run was not trained again
    assert open(os.path.join(first, sw.RESULT_FILE)).read() == done_record
    assert open(os.path.join(first, "metrics.jsonl")).read() == first_metrics

    # the resumed run ends exactly where an uninterrupted one does, as `barkgpt train --resume`
    ref = str(tmp_path / "ref")
    p = _run_script(KILL_SWEEP.format(), ref, "restart")
    assert p.returncode == 0, p.stderr
    for name in ("000-n_embd=16", "001-n_embd=32", "002-n_embd=24"):
        a, b = _weights(os.path.join(out, "runs", name)), _weights(os.path.join(ref, "runs", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    got = json.load(open(os.path.join(out, "results.json")))["runs"]
    want = json.load(open(os.path.join(ref, "results.json")))["runs"]
    assert [r["final_val_loss"] for r in got] == [r["final_val_loss"] for r in want]
    assert [r["val_history"] for r in got] == [r["val_history"] for r in want]
    # the resumed run's clock counts both of its attempts (each restarts at 0 in metrics.jsonl)
    assert got[1]["wall_sec"] > 0


CONCURRENT = """
import sys
import barkgpt
barkgpt.sweep(sys.argv[1], grid={"n_layer": [1, 2], "n_embd": [16, 32]}, steps=6,
              train_settings={"batch_size": 8}, backend="torch", progress=False)
"""


def test_two_concurrent_sweeps_train_each_run_once(tmp_path):
    out = str(tmp_path / "s")
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, out], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        errs.append(err)
    trained = [{ln.split()[2] for ln in e.splitlines() if ln.startswith("sweep: finished ")} for e in errs]
    names = {f"{i:03d}-n_layer={l}-n_embd={c}" for i, (l, c) in enumerate([(1, 16), (1, 32), (2, 16), (2, 32)])}
    assert trained[0].isdisjoint(trained[1]), trained
    assert trained[0] | trained[1] == names
    for name in names:  # each run's log is one uninterrupted pass over its steps
        steps = [json.loads(x)["step"] for x in open(os.path.join(out, "runs", name, "metrics.jsonl"))
                 if '"loss"' in x]
        assert steps == sorted(set(steps)) and steps[-1] == 6
    assert len(json.load(open(os.path.join(out, "results.json")))["runs"]) == 4


def test_run_lock_is_exclusive_and_released_on_close(tmp_path):
    run = sw.Run(index=0, name="000-x", settings={}, train={"steps": 1}, params=1, non_embedding_params=1,
                 flops_per_token=1, tokens_per_step=1)
    a, b = sw.RunLock(str(tmp_path), run), sw.RunLock(str(tmp_path), run)
    assert a.acquire()
    assert not b.acquire()
    assert sw.run_status(str(tmp_path), run) == "running"
    a.release()
    assert b.acquire()
    b.release()
    assert sw.run_status(str(tmp_path), run) == "pending"


# ---- bad grids and budgets -------------------------------------------------------------------------------

@pytest.mark.parametrize("items, msg", [
    (["n_layer"], "is not KEY=V1,V2"),
    (["=1,2"], "is not KEY=V1,V2"),
    (["n_layer=1,,2"], "empty value"),
    (["n_layer="], "empty value"),
    (["n_layer=1", "n_layer=2"], "given twice"),
])
def test_bad_grid_syntax(items, msg):
    with pytest.raises(SweepError, match=msg):
        sw.parse_grid(items)


def test_grid_values_are_typed():
    assert sw.parse_grid(["n_layer=1,2", "dropout=0.1", "bias=true,false", "ffn_hidden=none,64",
                          "preset=bark,small"]) == {
        "n_layer": [1, 2], "dropout": [0.1], "bias": [True, False], "ffn_hidden": [None, 64],
        "preset": ["bark", "small"]}


@pytest.mark.parametrize("kw, msg", [
    (dict(grid={"n_layers": [1, 2]}, steps=5), "unknown grid key 'n_layers'"),
    (dict(grid={"steps": [1, 2]}, steps=5), "the budget is --steps/--tokens/--flops"),
    (dict(grid={"n_layer": []}, steps=5), "non-empty list"),
    (dict(grid={"n_layer": [1, 1]}, steps=5), "lists a value twice"),
    (dict(grid={"n_layer": [1]}), "exactly one budget"),
    (dict(grid={"n_layer": [1]}, steps=5, flops=1e9), "exactly one budget"),
    (dict(grid={"n_layer": [1]}, steps=0), "positive finite"),
    (dict(grid={"n_layer": [1]}, flops=float("inf")), "positive finite"),
    (dict(grid={"n_layer": [1]}, tokens=2.5), "whole number"),
    (dict(grid={"n_layer": [1]}, tokens=100, train_settings={"batch_size": 8}), "less than one step of 256 tokens"),
    (dict(grid={"n_layer": [1]}, flops=1e6), "FLOP budget 1e\\+06 is less than one step"),
    (dict(grid={"n_layer": [1]}, steps=5, train_settings={"out": "x"}), "unknown or per-sweep training setting"),
    (dict(grid={"n_layer": [1]}, steps=5, preset="nope"), "unknown preset 'nope'"),
    (dict(grid={"n_layer": [1]}, steps=5, data="/nonexistent/corpus.txt"), "the data cannot be used"),
    (dict(steps=5), "has no runs"),
])
def test_bad_grids_and_budgets_fail_before_anything_is_written(tmp_path, kw, msg):
    out = tmp_path / "s"
    with pytest.raises(SweepError, match=msg):
        barkgpt.sweep(str(out), **QUIET, **kw)
    assert not out.exists()


def test_invalid_combinations_are_all_reported_up_front(tmp_path):
    out = tmp_path / "s"
    grid = {"n_embd": [32, 48, 30], "n_head": [2, 4], "lr": [1e-2, 20.0]}
    with pytest.raises(SweepError) as e:
        barkgpt.sweep(str(out), grid=grid, steps=5, **QUIET)
    msg = str(e.value)
    assert "nothing was trained" in msg and "--skip-invalid" in msg
    # 30 is not divisible by 4; lr 20 is out of range: 2 x 2 x 1 + 1 x 1 x 1 invalid ... every one named
    bad = [ln for ln in msg.splitlines() if ln.strip().startswith("run ")]
    expected = [i for i, (c, h, lr) in enumerate((c, h, lr) for c in grid["n_embd"] for h in grid["n_head"]
                                                  for lr in grid["lr"]) if c % h or lr >= 10]
    assert [int(ln.split()[1]) for ln in bad] == expected
    assert any("must be divisible by n_head" in ln for ln in bad) and any("lr must be" in ln for ln in bad)
    assert not out.exists()
    # --skip-invalid leaves them out and names them
    log = []
    runs = sw.plan(sw.normalize_spec({"grid": grid, "budget": {"steps": 5}}), skip_invalid=True, say=log.append)
    assert [r.index for r in runs] == [i for i in range(12) if i not in expected]
    assert len(log) == len(expected)


def test_flops_budget_gives_equal_compute(tmp_path):
    spec = sw.normalize_spec({"preset": "bark", "grid": {"n_embd": [16, 64]}, "budget": {"flops": 5e9},
                              "train": {"batch_size": 8}})
    small, big = sw.plan(spec)
    assert small.steps > big.steps
    for r in (small, big):  # as many whole steps as fit in the budget
        per_step = r.flops_per_token * r.tokens_per_step
        assert r.steps == int(5e9 // per_step) and 5e9 - per_step < r.train_flops <= 5e9
    tok = sw.plan(sw.normalize_spec({"grid": {"n_embd": [16, 64]}, "budget": {"tokens": 10_000},
                                     "train": {"batch_size": 8}}))
    assert [r.steps for r in tok] == [10_000 // 256] * 2


def test_another_sweep_in_the_same_out_is_refused(tiny):
    out, _, _ = tiny
    with pytest.raises(SweepError, match="holds another sweep"):
        barkgpt.sweep(out, grid={"n_layer": [1, 2], "n_embd": [16, 64]}, steps=8, train_settings=TRAIN, **QUIET)
    with pytest.raises(SweepError, match="--only \\[7\\]: no such run"):
        barkgpt.sweep(out, only=[7], **QUIET)


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert cli.main(["sweep", "--out", out, "--grid", "n_embd=30", "n_head=4", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("barkgpt sweep: error: 1 of 1 runs are invalid") and "divisible" in err
    assert cli.main(["sweep", "--out", out]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two budgets: argparse refuses
        cli.main(["sweep", "--out", out, "--grid", "n_layer=1", "--steps", "3", "--flops", "1e9"])
    spec = tmp_path / "spec.toml"
    spec.write_text('preset = "bark"\n[grid]\nn_layer = [1, 2]\n[budget]\nsteps = 0\n')
    assert cli.main(["sweep", "--out", out, "--spec", str(spec)]) == 2
    assert "positive finite number" in capsys.readouterr().err
    spec.write_text("[grid\n")
    assert cli.main(["sweep", "--out", out, "--spec", str(spec)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_spec_file_json_and_toml_plan_alike(tmp_path):
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"preset": "bark", "grid": {"n_layer": [1, 2]}, "runs": [{"name": "wide", "n_embd": 64}],
                             "budget": {"flops": 1e10}, "train": {"batch_size": 8}}))
    t = tmp_path / "s.toml"
    t.write_text('preset = "bark"\n[grid]\nn_layer = [1, 2]\n[[runs]]\nname = "wide"\nn_embd = 64\n'
                 '[budget]\nflops = 1e10\n[train]\nbatch_size = 8\n')
    a = sw.plan(sw.normalize_spec(sw.load_spec(str(j))))
    b = sw.plan(sw.normalize_spec(sw.load_spec(str(t))))
    assert [(r.name, r.steps) for r in a] == [(r.name, r.steps) for r in b]
    assert [r.name for r in a] == ["000-n_layer=1", "001-n_layer=2", "002-wide"]


# ---- the power-law fit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("E, A, alpha", [(1.7, 40.0, 0.35), (0.0, 12.0, 0.08), (3.2, 1e4, 0.9)])
def test_power_law_fit_recovers_known_parameters(E, A, alpha):
    n = np.logspace(3, 8, 9)
    fit = sw.fit_power_law(n, E + A / n ** alpha)
    assert fit.E == pytest.approx(E, abs=1e-6)
    assert fit.alpha == pytest.approx(alpha, rel=1e-5)
    assert fit.A == pytest.approx(A, rel=1e-4)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and fit.n == 9
    assert not [w for w in fit.warnings if "poor" in w or "only" in w]


def test_power_law_fit_with_noise_stays_close():
    rng = np.random.default_rng(0)
    n = np.logspace(4, 7, 12)
    y = (1.5 + 25.0 / n ** 0.3) * (1 + 0.002 * rng.standard_normal(n.size))
    fit = sw.fit_power_law(n, y)
    assert fit.E == pytest.approx(1.5, abs=0.08) and fit.alpha == pytest.approx(0.3, rel=0.2)
    assert fit.r2 > 0.99 and fit.warnings == []


def test_power_law_fit_warns_when_it_should():
    few = sw.fit_power_law([1e3, 1e4, 1e5, 1e6], [3.0, 2.5, 2.2, 2.0])
    assert any("only 4 points" in w for w in few.warnings)
    poor = sw.fit_power_law(np.logspace(3, 6, 8), [2.0, 3.0, 1.5, 2.8, 1.2, 2.9, 1.8, 2.5])
    assert any("poor fit" in w for w in poor.warnings)
    flat = sw.fit_power_law(np.logspace(3, 6, 6), [2.0, 2.1, 2.2, 2.3, 2.4, 2.5])
    assert flat.A == 0 and any("does not fall" in w for w in flat.warnings)
    narrow = sw.fit_power_law([1e3, 1.2e3, 1.5e3, 2e3, 2.5e3], [3.0, 2.9, 2.8, 2.75, 2.7])
    assert any("spans only" in w for w in narrow.warnings)
    with pytest.raises(ValueError, match="at least 3 points"):
        sw.fit_power_law([1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        sw.fit_power_law([0, 1, 2], [1, 2, 3])


def test_compute_frontier_keeps_only_improvements():
    xs, ys = sw.compute_frontier([([1, 2, 4, 8], [5.0, 4.0, 3.5, 3.4]), ([3, 6, 12], [4.2, 3.0, 2.5])])
    # from 3 on, where both curves have points: a curve's first point is not "best" for being early
    assert xs == [3, 4, 6, 12] and ys == [4.2, 3.5, 3.0, 2.5]
    assert sw.compute_frontier([([1, 2], [3.0, 2.0]), ([], [])]) == ([1, 2], [3.0, 2.0])


def test_wall_time_sums_every_attempt(tmp_path):
    lines = [{"step": 10, "elapsed_sec": 1.0}, {"step": 20, "elapsed_sec": 2.0}, {"step": 20, "val_loss": 1.0},
             {"step": 30, "elapsed_sec": 0.5}, {"step": 40, "elapsed_sec": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4')
    assert sw._wall_seconds(str(tmp_path)) == pytest.approx(3.5)


def test_readme_spec_example_plans(tmp_path):
    import re
    import tomllib

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = re.search(r"A spec file, e.g. `sweep.toml`:\n\n```toml\n(.*?)```", readme, re.S).group(1)
    spec = tomllib.loads(block)
    assert spec["data"] == "corpus.txt"
    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    spec["data"] = str(tmp_path / "corpus.txt")
    runs = sw.plan(sw.normalize_spec(spec))
    assert [r.name for r in runs] == ["000-n_layer=2", "001-n_layer=4", "002-wide"]
    assert all(r.train_flops <= 1e13 and r.train["batch_size"] == 32 for r in runs)
    assert runs[2].train["model"]["n_embd"] == 256 and runs[2].train["model"]["vocab_size"] == 256


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    real_train = sw.train

    def train(config=None, **kw):
        out = config.out if config is not None else kw["out"]
        if os.path.basename(out).startswith("001-"):
            raise barkgpt.TrainingError("non-finite loss at step 3 (nan); stopping")
        return real_train(config, **kw)

    monkeypatch.setattr(sw, "train", train)
    out = str(tmp_path / "s")
    log = []
    res = barkgpt.sweep(out, grid={"n_embd": [8, 16, 24]}, steps=3, train_settings={"batch_size": 4},
                        log=log.append, **QUIET)
    assert "sweep: run 001-n_embd=16 failed: non-finite loss at step 3 (nan); stopping" in log
    assert any(m.startswith("sweep: finished 002-n_embd=24") for m in log)  # went on after it
    assert [r.get("status", "ok") for r in res.runs] == ["ok", "failed", "ok"] and res.pending == []
    assert res.runs[1]["final_val_loss"] is None
    md = open(res.files["md"]).read()
    assert "Failed (1): `001-n_embd=16`: non-finite loss at step 3 (nan); stopping" in md
    assert "| 001-n_embd=16 | " in md and "n/a" in md
    rows = list(csv.DictReader(open(res.files["csv"])))
    assert rows[1]["error"].startswith("non-finite") and rows[0]["error"] == ""
    # a restart does not retry it (the sweep's settings are fixed): it shows as failed
    log.clear()
    barkgpt.sweep(out, log=log.append, **QUIET)
    assert not any(m.startswith("sweep: run ") for m in log)
    assert cli.main(["sweep", "--out", out, "--list"]) == 0
    assert [ln.split()[1] for ln in capsys.readouterr().out.splitlines()] == ["done", "failed", "done"]


def test_readme_sweep_and_plot_commands_use_real_flags():
    import re

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    parser = cli.build_parser()
    seen = 0
    for m in re.finditer(r"barkgpt (sweep|plot)\b([^\n`#]*)", readme):
        cmd, rest = m.groups()
        sub = parser._subparsers._group_actions[0].choices[cmd]  # noqa: SLF001
        options = {o for act in sub._actions for o in act.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z0-9-]+)", rest):
            assert flag in options, f"README: `barkgpt {cmd} ... {flag}`"
            seen += 1
    assert seen >= 10
