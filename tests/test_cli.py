import os
import subprocess
import sys

import pytest

from barkgpt.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], capture_output=True, text=True,
                          env={**os.environ, "BARKGPT_BACKEND": "torch"})


def test_train_then_generate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "40", "--eval-every", "20", "--out", out, "--no-progress",
                 "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert "corpus optimum" in err and "sample: User: speak Assistant:" in err
    assert main(["generate", out, "--num-samples", "2", "--seed", "0", "--backend", "torch"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("User: speak Assistant:") for l in lines)
    assert main(["train", "--steps", "60", "--out", out, "--resume", "--no-progress", "--no-sample"]) == 0
    assert "resuming" in capsys.readouterr().err


def test_help_lists_the_documented_flags():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--preset", "--config", "--data", "--steps", "--batch-size", "--grad-accum", "--lr", "--seed",
                 "--device", "--backend", "--dtype", "--out", "--resume", "--eval-every", "--save-every"):
        assert flag in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["train", "--steps", "-3"], "expected a positive integer"),
    (["train", "--lr", "abc"], "expected a positive number"),
    (["train", "--preset", "huge"], "invalid choice: 'huge'"),
    (["train", "--config", "/nonexistent.json"], "config file '/nonexistent.json' does not exist"),
    (["train", "--data", "/nonexistent.txt"], "does not exist"),
    (["generate", "/nonexistent-run"], "is not a directory"),
])
def test_user_errors_are_one_line_no_traceback(args, msg):
    r = run_cli(*args)
    assert r.returncode == 2
    assert msg in r.stderr
    assert "Traceback" not in r.stderr


def test_presets_and_info():
    r = run_cli("presets")
    assert r.returncode == 0 and "bark-tiny" in r.stdout and "124.4" in r.stdout
    r = run_cli("info")
    assert r.returncode == 0 and "cpu   torch   available" in r.stdout
