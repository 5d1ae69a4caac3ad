"""The library reads top-down: no import cycles (function-local imports count), kernels/ imports
nothing from barkgpt, the tokenizers have their own module (old names and pickles still work),
and what setup.py and the JIT build share is computed once."""

import ast
import os
import pickle

import barkgpt
from barkgpt import _build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# cli -> train -> checkpoint/model -> ops -> backends -> registry/opdecls -> reference
LAYER = {"cli": 0, "__main__": 0, "train": 1, "distributed": 2, "checkpoint": 3, "model": 4, "generate": 5,
         "data": 5, "tokenizer": 6, "ops": 6, "_cpp": 7, "_triton": 7, "opdecls": 8, "registry": 9,
         "perf": 10, "reference": 10, "_checks": 11, "_build": 11, "config": 11, "kernels": 12}


def _modules():
    out = {}
    for root, pkg in (("barkgpt", "barkgpt"), ("kernels", "barkgpt.kernels")):
        for f in sorted(os.listdir(os.path.join(REPO, root))):
            if f.endswith(".py"):
                name = pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"
                out[name] = os.path.join(REPO, root, f)
    return out


def _imports(name, path, mods):
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = base + ("." + node.module if node.module else "")
            else:
                mod = node.module or ""
            for a in node.names:
                deps.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in mods and d != name}


def test_no_import_cycles_and_no_upward_edges():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}

    def layer(m):
        if m.startswith("barkgpt.kernels"):
            return LAYER["kernels"]
        return LAYER.get(m.split(".")[-1], None)

    for m, deps in graph.items():
        if m == "barkgpt":
            continue  # the package's __init__ re-exports the public names
        for d in deps:
            if d == "barkgpt" or layer(m) is None or layer(d) is None:
                assert d != "barkgpt" or m.startswith("barkgpt.kernels") is False, (m, d)
                continue
            same_package_init = m.startswith("barkgpt.kernels") and d == "barkgpt.kernels"
            assert not same_package_init or m == "barkgpt.kernels", f"{m} imports back from kernels/__init__"
            if not same_package_init:
                assert layer(d) >= layer(m), f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)}): an upward edge"
    # and no cycles at all
    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_kernels_import_nothing_from_barkgpt():
    mods = _modules()
    for m, p in mods.items():
        if m.startswith("barkgpt.kernels"):
            outside = {d for d in _imports(m, p, mods) if not d.startswith("barkgpt.kernels")}
            assert not outside, f"{m} imports {outside}"


def test_tokenizers_have_their_own_module_and_old_names_still_work():
    from barkgpt import data, tokenizer

    for name in ("BarkTokenizer", "ByteTokenizer", "BPETokenizer", "tokenizer_from_dict", "DataError"):
        assert getattr(data, name) is getattr(tokenizer, name)
    # a pickle written before the move (it names barkgpt.data) loads
    for obj in (tokenizer.ByteTokenizer(), tokenizer.BarkTokenizer()):
        old = pickle.dumps(obj, protocol=2).replace(b"barkgpt.tokenizer", b"barkgpt.data")
        assert b"barkgpt.data" in old
        assert type(pickle.loads(old)) is type(obj)
    assert isinstance(barkgpt.data.DataError("x"), ValueError)


def test_openmp_is_detected_from_the_parallel_backend_only():
    # torch's parallel_info names OpenMP even when ATen's parallel backend is the native pool;
    # setup.py once tested for the bare word, the JIT build for the backend line.
    native = "ATen/Parallel:\n\tat::get_num_threads() : 2\nATen parallel backend: native thread pool\n" \
             "OpenMP 201511 (a.k.a. OpenMP 4.5)\n"
    omp = "ATen/Parallel:\nATen parallel backend: OpenMP\nOpenMP 201511 (a.k.a. OpenMP 4.5)\n"
    assert not _build.uses_openmp(native)
    assert _build.uses_openmp(omp)
    cflags, ldflags = _build.compiler_flags(True, "-march=native", python_module=True)
    if os.name != "nt":
        assert cflags == ["-O3", "-fno-math-errno", "-DBARKGPT_PYTHON_MODULE", "-march=native", "-fopenmp"]
        assert ldflags == ["-fopenmp"]
        assert _build.compiler_flags(False) == (["-O3", "-fno-math-errno"], [])
    setup_py = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    assert "_build.compiler_flags(" in setup_py and "parallel_info()" in setup_py.split("_build.uses_openmp(")[1][:60]


def test_explicit_flags_leave_the_parser_alone(monkeypatch):
    from barkgpt import cli

    argv = ["train", "--resume", "--steps", "5", "--out", "x"]
    assert cli._explicit_flags(argv) == {"resume", "steps", "out"}
    # `python -m barkgpt train ...`: main(None) reads sys.argv
    monkeypatch.setattr(cli.sys, "argv", ["barkgpt", "train", "--ste=7", "--resume"])
    assert cli._explicit_flags(None) == {"resume", "steps"}
    # the parser main() uses keeps its defaults
    a = cli.build_parser().parse_args(["train"])
    assert a.steps == 600 and a.backend == "auto"
