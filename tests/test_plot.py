"""Loss charts: `barkgpt plot`, and the loss.png every training run writes."""

import importlib
import json
import os
import sys
import warnings

import pytest

import barkgpt
from barkgpt import cli

plot = importlib.import_module("barkgpt.plot")
PNG = b"\x89PNG\r\n\x1a\n"
FAST = dict(progress=False, sample=False, backend="torch", log=lambda m: None)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


class Crash(Exception):
    pass


def _crash_at(n):
    def hook(step, loss):
        if step == n:
            raise Crash
    return hook


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    a = barkgpt.train(steps=12, eval_every=4, save_every=6, batch_size=8, out=str(root / "a"), **FAST)
    b = barkgpt.train(steps=8, eval_every=4, batch_size=4, lr=3e-3, out=str(root / "b"), **FAST)
    return a.out_dir, b.out_dir


def test_training_writes_loss_png_at_the_end(runs):
    for d in runs:
        assert _is_png(os.path.join(d, "loss.png"))


def test_training_writes_loss_png_at_each_checkpoint(tmp_path):
    # the run dies after its checkpoint at step 6: the chart drawn there is on disk
    with pytest.raises(Crash):
        barkgpt.train(steps=12, eval_every=3, save_every=6, batch_size=8, out=str(tmp_path / "r"),
                      on_step=_crash_at(8), **FAST)
    assert _is_png(tmp_path / "r" / "loss.png")


def test_training_without_matplotlib_skips_the_chart_quietly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert not plot.have_matplotlib()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = barkgpt.train(steps=4, eval_every=2, save_every=2, batch_size=4, out=str(tmp_path / "r"), **FAST)
    assert not os.path.exists(os.path.join(r.out_dir, "loss.png"))
    assert os.path.exists(os.path.join(r.out_dir, "model.safetensors"))
    with pytest.raises(plot.PlotError, match="needs matplotlib"):
        plot.plot_runs([r.out_dir])


def test_a_failing_chart_warns_and_never_ends_the_run(runs, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(plot, "plot_runs", boom)
    with pytest.warns(UserWarning, match="could not draw .*loss.png: disk on fire"):
        assert plot.write_loss_png(runs[0]) is None


def test_read_run_curves_steps_and_tokens(runs):
    a = plot.read_run(runs[0])
    assert [s for s, _ in a["val"]] == [4, 8, 12]
    assert [s for s, _ in a["train"]] == [10, 12]  # log_every 10 and the last step
    assert a["tokens_per_step"] == 8 * 32 and plot.read_run(runs[1])["tokens_per_step"] == 4 * 32
    assert a["optimal_loss"] is not None


def test_read_run_tolerates_a_crash_cut_line_and_keeps_the_last_of_a_repeated_step(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "val_loss": 2.5},
             {"step": 20, "loss": 1.9}, {"step": 30, "loss": float("nan")}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 40, "lo')
    r = plot.read_run(str(d))
    assert r["train"] == [(10, 3.0), (20, 1.9)] and r["val"] == [(20, 2.5)]
    assert r["tokens_per_step"] is None  # no train_config.json: no tokens axis, still a chart
    assert _is_png(plot.plot_runs([str(d)], out=str(tmp_path / "x.png")))


def test_cli_plot_compares_runs_on_one_chart(runs, tmp_path, capsys):
    out = str(tmp_path / "cmp.png")
    assert cli.main(["plot", *runs, "--out", out, "--title", "two runs", "--log-y"]) == 0
    assert capsys.readouterr().out.strip() == out and _is_png(out)
    assert cli.main(["plot", runs[1]]) == 0  # one run: its own loss.png
    assert capsys.readouterr().out.strip() == os.path.join(runs[1], "loss.png")


@pytest.mark.parametrize("make, msg", [
    (lambda p: None, "not a run directory"),
    (lambda p: p.mkdir(), "has no metrics.jsonl"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')), "logged no loss yet"),
])
def test_cli_plot_errors_are_one_line(tmp_path, capsys, make, msg):
    d = tmp_path / "run"
    make(d)
    assert cli.main(["plot", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("barkgpt plot: error:") and msg in err and len(err.strip().splitlines()) == 1
