import os
import re
import subprocess
import sys

import pytest

from barkgpt import cli
from barkgpt.cli import build_parser, main
from helpers import run_python

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


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
    # A tiny positive temperature is its limit, greedy (it used to overflow into inf/nan and
    # end in multinomial's RuntimeError); 1e-320 even underflows to 0 in float32.
    assert main(["generate", out, "--greedy", "--top-k", "0", "--backend", "torch"]) == 0
    greedy = capsys.readouterr().out
    for t in ("1e-40", "1e-320"):
        assert main(["generate", out, "--temperature", t, "--num-samples", "2", "--seed", "1",
                     "--backend", "torch"]) == 0
        assert capsys.readouterr().out == greedy * 2
    assert main(["train", "--steps", "60", "--out", out, "--resume", "--no-progress", "--no-sample"]) == 0
    assert "resuming" in capsys.readouterr().err


def _options(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001
    return {o for act in sub._actions for o in act.option_strings} - {"-h", "--help"}


def _readme_train_flags():
    text = open(README, encoding="utf-8").read()
    m = re.search(r"`barkgpt train --help` documents every flag: (.*?)\.(\s|$)", text, re.S)
    assert m, "README lost its list of train flags"
    return re.findall(r"`(--[a-z0-9-]+)`", m.group(1))


def test_help_lists_the_documented_flags():
    listed = _readme_train_flags()
    assert len(listed) == len(set(listed)), "a flag is listed twice"
    # The README list is every train flag, no more, no less ...
    assert set(listed) == _options("train")
    # ... and each one shows in the real --help output.
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in listed:
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", r.stdout), flag


def test_readme_commands_use_real_flags():
    """Every `barkgpt CMD --flag` the README shows exists for CMD."""
    text = open(README, encoding="utf-8").read()
    seen = 0
    for m in re.finditer(r"barkgpt (train|generate|tokenize)\b([^\n`#]*)", text):
        cmd, rest = m.groups()
        for flag in re.findall(r"(?<![\w-])(--[a-z0-9-]+)", rest):
            assert flag in _options(cmd) | {"--help"}, f"README: `barkgpt {cmd} ... {flag}`"
            seen += 1
    for cmd in ("generate",):  # the prose list of generate's flags
        m = re.search(r"`barkgpt generate --help` documents\s(.*?):", text, re.S)
        assert m and set(re.findall(r"`(--[a-z0-9-]+)`", m.group(1))) == _options(cmd)
    assert seen > 20


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


@pytest.mark.parametrize("args, msg", [
    (["train", "--seed", "99999999999999999999"],
     "argument --seed: expected an integer in [-9223372036854775808, 18446744073709551614], "
     "got 99999999999999999999"),
    (["train", "--seed", str(2 ** 64 - 1)], "argument --seed: expected an integer in"),  # seed + 1 seeds the data
    (["train", "--seed", str(-2 ** 63 - 1)], "argument --seed: expected an integer in"),
    (["train", "--seed", "1.5"], "argument --seed: expected an integer in [-9223372036854775808, 184467"),
    (["generate", "run", "--seed", "99999999999999999999"],
     "argument --seed: expected an integer in [-9223372036854775808, 18446744073709551615], "
     "got 99999999999999999999"),
    (["generate", "run", "--temperature=-1e-40"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "run", "--temperature", "nan"], "argument --temperature: expected a finite number >= 0"),
])
def test_out_of_range_flags_name_the_flag(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Overflow" not in err


def test_seed_range_is_what_torch_accepts():
    import torch

    for lo, hi, command in ((cli.SEED_MIN, cli.SEED_MAX - 1, "train"), (cli.SEED_MIN, cli.SEED_MAX, "generate")):
        args = ["run"] if command == "generate" else []
        for seed in (lo, -1, 0, hi):
            assert build_parser().parse_args([command, *args, "--seed", str(seed)]).seed == seed
            torch.Generator().manual_seed(seed)
            if command == "train":
                torch.Generator().manual_seed(seed + 1)  # train seeds its data stream with seed + 1
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(cli.SEED_MAX + 1)
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(cli.SEED_MIN - 1)


def test_config_that_is_a_directory(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"barkgpt train: error: config file {str(tmp_path)!r} is a directory; give a GPTConfig JSON file\n"


def test_out_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a run directory\n")
    r = run_cli("train", "--out", str(taken), "--steps", "2", "--no-progress", "--no-sample")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("barkgpt train: error: ") and str(taken) in errors[0]
    assert taken.read_text() == "not a run directory\n"


@pytest.mark.parametrize("exc, want", [
    (FileExistsError(17, "File exists", "/x/run"), "File exists: '/x/run'"),
    (PermissionError(13, "Permission denied", "/root/run"), "Permission denied: '/root/run'"),
    (NotADirectoryError(20, "Not a directory", "/x/file/ckpt"), "Not a directory: '/x/file/ckpt'"),
    (FileNotFoundError(2, "No such file or directory", "/a", None, "/b"), "No such file or directory: '/a' -> '/b'"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (OSError("something odd\non two lines"), "something odd on two lines"),
])
def test_os_errors_are_user_errors(monkeypatch, capsys, exc, want):
    def fail(_a):
        raise exc

    monkeypatch.setattr(cli, "_cmd_info", fail)
    monkeypatch.delenv("BARKGPT_DEBUG", raising=False)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == f"barkgpt info: error: {want}\n"
    monkeypatch.setenv("BARKGPT_DEBUG", "1")  # the traceback, for bug reports
    with pytest.raises(type(exc)):
        main(["info"])


def test_presets_and_info():
    r = run_cli("presets")
    assert r.returncode == 0 and "bark-tiny" in r.stdout and "124.4" in r.stdout
    r = run_cli("info")
    assert r.returncode == 0 and "cpu   torch   available" in r.stdout


def test_info_with_built_kernels_says_nothing_about_cuda_home(tmp_path):
    # A CUDA build of torch on a machine without a GPU logs "No CUDA runtime is found, using
    # CUDA_HOME=..." when torch.utils.cpp_extension is imported. barkgpt must not import it when
    # the C++ kernels are already built, and must drop that notice when it does build them.
    from barkgpt import ops

    if ops.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the C++ kernels are not built here")
    (tmp_path / "cuda").mkdir()
    code = """
        import sys
        import torch
        from barkgpt.cli import main             # (imports torch._dynamo before the pretence)
        torch.cuda._is_compiled = lambda: True   # what a CUDA build of torch says
        torch.version.cuda = "12.8"
        torch.cuda.is_available = lambda: False  # ... on a machine without a GPU
        rc = main(["info"])
        print("cpp_extension imported:", "torch.utils.cpp_extension" in sys.modules)
        from barkgpt import _cpp
        _cpp._cpp_extension()                    # the import a build does: no notice either
        sys.exit(rc)
    """
    r = run_python(code, env={"CUDA_HOME": str(tmp_path / "cuda")})
    assert r.returncode == 0, r.stderr
    assert "cpu   cpp     available" in r.stdout
    assert "cpp_extension imported: False" in r.stdout
    assert "CUDA_HOME" not in r.stdout + r.stderr, r.stderr
    # the simulation is real: importing the module outside barkgpt's filter does log it
    r = run_python(code.replace("_cpp._cpp_extension()", "import torch.utils.cpp_extension"),
                   env={"CUDA_HOME": str(tmp_path / "cuda")})
    assert "No CUDA runtime is found" in r.stderr
