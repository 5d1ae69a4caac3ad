"""The benchmark report (benchmarks/_report.py) from synthetic records: where it writes, what the
terminal shows, targets named by what they measure, the plain-PyTorch comparison in the tables."""

import importlib.util
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_report():
    spec = importlib.util.spec_from_file_location("_bench_report", os.path.join(REPO, "benchmarks", "_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _load_report()


def _rec(group, case, mode, provider, t, **extra):
    return {"group": group, "case": case, "mode": mode, "provider": provider, "status": "ok", "median_s": t,
            **extra}


def _records():
    recs = []
    for case in ("rows=4096 n=8", "rows=4096 n=768"):
        for prov, t in (("eager", 2e-4), ("barkgpt-cpp", 1e-4), ("barkgpt-torch", 2.1e-4), ("compile", 4e-4)):
            recs.append(_rec("layer_norm", case, "fwd+bwd", prov, t, gbps=1.0))
    for case in ("bark", "small"):
        for prov, t in (("auto", 0.94), ("torch", 1.2), ("compile-torch", 1.1), ("plain", 1.3),
                        ("compile-plain", 1.0), ("compile-auto", 0.9)):
            recs.append(_rec("training", case, "step", prov, t * 1e-2, tokens_per_s=2048 / (t * 1e-2),
                             shape={"B": 64, "T": 32}))
    return recs


META = {"device_type": "cpu", "device_name": "test CPU", "kind": "cpu", "cpu_model": "x", "cpu_count": 2,
        "torch_threads": 2, "torch": "2.x", "triton": "3.x", "python": "3.11", "date": "2026-11-30T00:00:00Z",
        "git_commit": "abc", "command": "pytest benchmarks/", "size": "small", "dtype": "float32",
        "cache_bytes": 32 << 20, "backends": {"cpp": "available", "torch": "available"}, "auto_backend": "cpp",
        "loadavg_start": "0", "loadavg_end": "0"}


def test_default_output_is_ignored_by_git():
    rel = os.path.relpath(os.path.join(R.DEFAULT_OUT_DIR, "cpu-small.json"), REPO)
    assert not rel.startswith(os.path.join("benchmarks", "results"))
    r = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, f"{rel} is not ignored by git: a benchmark run would dirty the checkout"


def test_terminal_summary_is_short_tables_without_targets():
    lines = R.summary(_records(), META)
    assert lines and max(len(x) for x in lines) <= 100
    text = "\n".join(lines)
    assert "LayerNorm fwd+bwd time: speed-up over PyTorch eager" in text
    assert "training tokens/s: speed-up over torch.compile of plain PyTorch" in text
    row = next(x for x in lines if x.strip().startswith("bark "))
    assert "0.94x" not in row and "1.06x" in row  # auto vs compile-plain: 1.00 / 0.94
    assert "PASS" not in text and "FAIL" not in text and not re.search(r"#\d", text)


def test_targets_are_named_by_what_they_measure():
    targets = R.evaluate_targets(_records(), META)
    assert targets
    for t in targets:
        assert "issue" not in t and not re.search(r"#\d", t["target"] + t["needs"])
    md = R.markdown(_records(), META, targets)
    assert "| target | needs | measured | result |" in md and not re.search(r"#\d", md)


def test_tables_compare_with_compiled_plain_pytorch():
    md = R.markdown(_records(), META, R.evaluate_targets(_records(), META))
    assert "auto/compile-plain" in md and "compile-auto/compile-plain" in md
    assert "bark: barkgpt's default (eager) step runs at 1.06x the tokens/s of torch.compile'd plain PyTorch; " \
           "torch.compile'd barkgpt at 1.11x" in md


def test_chart_colours_labels_and_values(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    orig = plt.subplots

    def keep(*a, **k):
        fig, axes = orig(*a, **k)
        figs.append(fig)
        return fig, axes

    plt.close_ = plt.close
    try:
        plt.subplots = keep
        plt.close = lambda fig=None: None
        assert R.chart(_records(), META, str(tmp_path / "c.png"))
    finally:
        plt.subplots, plt.close = orig, plt.close_
    assert (tmp_path / "c.png").stat().st_size > 0
    ax_ln, ax_train = figs[0].axes
    # every y tick above 1x is labelled (the old chart showed none on some panels)
    for ax in (ax_ln, ax_train):
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert any(lbl.endswith("x") and float(lbl[:-1]) > 1 for lbl in labels), labels
    # one colour per kind of provider, the same in every panel, different kinds told apart
    colour = {}
    for ax in (ax_ln, ax_train):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            colour[label] = matplotlib.colors.to_hex(handle.patches[0].get_facecolor())
    assert colour["barkgpt-cpp"] == colour["barkgpt (default backend)"]
    assert colour["barkgpt-torch"] == colour["barkgpt, PyTorch backend"]
    assert len(set(colour[k] for k in ("torch.compile(PyTorch eager)", "torch.compile(barkgpt)", "plain PyTorch",
                                       "barkgpt (default backend)", "barkgpt, PyTorch backend"))) == 5
    # the value is printed on each bar
    texts = [t.get_text() for t in ax_train.texts]
    assert "1.06" in texts and "1.11" in texts
    plt.close(figs[0])
