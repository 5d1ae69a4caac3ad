"""pytest configuration of the benchmark suite (``pytest benchmarks/``).

Settings come from the environment (see benchmarks/README.md): BARKGPT_BENCH_SIZE=small|full,
BARKGPT_BENCH_DEVICE, BARKGPT_BENCH_DTYPE, BARKGPT_BENCH_BUDGET_S, BARKGPT_BENCH_MEASURE_S,
BARKGPT_BENCH_THREADS, BARKGPT_BENCH_OUT (results folder; default benchmarks/out, which git ignores:
curated results are committed to benchmarks/results by running with BARKGPT_BENCH_OUT=benchmarks/results).
At the end of the session the results are written as JSON + Markdown + PNG, named by device kind
and size (cpu-small.*, h100-full.*); a run that selected only part of the suite writes *-partial.*
instead. The terminal shows the same-run speed-up tables and where the report is; pytest-benchmark's
own per-benchmark table (hundreds of wide lines) only with BARKGPT_BENCH_PYTEST_TABLE=1.
"""

import datetime
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the suite's helpers (_bench, _report) import by name

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

# Every shape and every model is a new specialization of the same functions: keep them all
# compiled instead of silently falling back to eager after the default 8 recompiles.
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, max(getattr(torch._dynamo.config, _name), 512))
for _name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, max(getattr(torch._dynamo.config, _name), 4096))

# BARKGPT_BENCH_THREADS: intra-op threads for the CPU run (default: torch's own choice).
if os.environ.get("BARKGPT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BARKGPT_BENCH_THREADS"]))

import _bench  # noqa: E402
import _report  # noqa: E402

# Run order: the copy ceiling first, then the cheap op groups, the attention shapes the targets
# name, training, and the other attention shapes (the longest) last, so a time budget cuts the least.
_ORDER = {"test_bench_copy.py": 0, "test_bench_layer_norm.py": 1, "test_bench_embedding.py": 2,
          "test_bench_training.py": 4, "test_bench_attention.py": 5}  # attention target shapes: 3
_session = {"deselected": 0, "failed": [], "loadavg_start": None}


def _loadavg():
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def pytest_sessionstart(session):
    # pytest-benchmark's own table is hundreds of lines up to ~300 characters wide: our summary
    # (pytest_terminal_summary below) replaces it unless asked for. Its session exists by now.
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None and os.environ.get("BARKGPT_BENCH_PYTEST_TABLE", "0") in ("", "0"):
        bench_session.display = lambda terminalreporter: None
    _bench.STATE["t0"] = time.time()
    _session["loadavg_start"] = _loadavg()
    _session["ticks_start"] = _cpu_ticks()


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_priority(n): run order within the benchmark suite (low first)")


def _priority(item):
    mark = item.get_closest_marker("bench_priority")
    if mark is not None:
        return mark.args[0]
    return _ORDER.get(os.path.basename(str(item.fspath)), 9)


def pytest_collection_modifyitems(session, config, items):
    bench = [i for i in items if os.path.dirname(str(i.fspath)) == HERE]
    if not bench:
        return
    slots = [n for n, i in enumerate(items) if os.path.dirname(str(i.fspath)) == HERE]
    bench.sort(key=_priority)
    for n, item in zip(slots, bench):
        items[n] = item


def pytest_deselected(items):
    _session["deselected"] += len(items)


def pytest_runtest_logreport(report):
    if report.failed:
        _session["failed"].append(report.nodeid.split("::", 1)[-1])


def _command(config) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BARKGPT_BENCH_")
                   and k != "BARKGPT_BENCH_OUT")
    argv0 = os.path.basename(sys.argv[0])
    prog = "python -m pytest" if argv0 in ("__main__.py", "pytest.py") else "pytest"
    args = " ".join(config.invocation_params.args)
    return " ".join(x for x in (env, prog, args) if x)


def _is_partial(session) -> bool:
    cfg = session.config
    if _session["deselected"] or cfg.option.keyword or cfg.option.markexpr:
        return True
    for a in cfg.args:
        path = os.path.abspath(a.split("::", 1)[0])
        if path != HERE:
            return True
    return False


def _git_commit() -> str:
    try:
        root = os.path.dirname(HERE)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        # Earlier results in benchmarks/results/ do not make the measured code differ from HEAD.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def _meta(session, exitstatus):
    from barkgpt import perf

    dev = _bench.DEVICE
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not installed"
    try:
        auto = __import__("barkgpt").ops.resolve_backend(None, dev)
    except Exception as e:  # noqa: BLE001
        auto = f"error: {e}"
    return {
        "device_type": dev.type,
        "device_name": perf.device_name(dev),
        "kind": perf.device_kind(dev),
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cpu_model": perf.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git_commit(),
        "command": _command(session.config),
        "size": _bench.SIZE,
        "dtype": str(_bench.DTYPE).replace("torch.", ""),
        "cache_bytes": _bench.CACHE_BYTES,
        "backends": _bench.backend_status(),
        "auto_backend": auto,
        "loadavg_start": _session["loadavg_start"],
        "loadavg_end": _loadavg(),
        "elapsed_s": round(time.time() - _bench.STATE["t0"], 1),
        "exitstatus": int(exitstatus),
        "failed": _session["failed"],
        "budget_skipped": _bench.STATE["budget_skipped"],
        "measure_s": _bench.MEASURE_S,
        "busy": _busy(),
        "other_processes_cores": _session.get("others_cores"),
    }


def _cpu_ticks():
    """(CPU ticks used by the whole machine, ticks used by this process and its descendants)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        total = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle, iowait
        procs = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                        st = f.read().rsplit(")", 1)[1].split()
                    procs[int(d)] = (int(st[1]), int(st[11]) + int(st[12]), int(st[13]) + int(st[14]))
                except (OSError, IndexError, ValueError):
                    continue
        me = os.getpid()
        mine, frontier = {me}, [me]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, _, _) in procs.items():
                if ppid == parent and pid not in mine:
                    mine.add(pid)
                    frontier.append(pid)
        own = sum(procs[p][1] for p in mine if p in procs) + procs.get(me, (0, 0, 0))[2]
        return total, own
    except (OSError, ValueError, IndexError):
        return None


def _busy():
    """A sentence when other processes used the CPU during the run, else None: on a small machine
    they deschedule our threads and multi-threaded timings fall apart."""
    start, end = _session.get("ticks_start"), _cpu_ticks()
    if not start or not end:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall = time.time() - _bench.STATE["t0"]
    others = ((end[0] - start[0]) - (end[1] - start[1])) / hz / max(wall, 1e-9)
    _session["others_cores"] = round(others, 2)
    if others > 0.1 * (os.cpu_count() or 1):
        return f"other processes used {others:.2f} of {os.cpu_count()} cores on average during the run"
    return None


def pytest_sessionfinish(session, exitstatus):
    records = _bench.STATE["records"]
    if not any(r.get("median_s") for r in records):
        _session["written"] = []  # nothing timed (e.g. --benchmark-disable): keep the last results
        return
    meta = _meta(session, exitstatus)
    # BARKGPT_BENCH_STEM names a deliberate selection (benchmarks/run_gpu.sh's phases), which
    # would otherwise be written as *-partial.*
    stem = os.environ.get("BARKGPT_BENCH_STEM") or (
        f"{meta['kind']}-{meta['size']}" + ("-partial" if _is_partial(session) else ""))
    out_dir = os.environ.get("BARKGPT_BENCH_OUT") or _report.DEFAULT_OUT_DIR
    paths = _report.write(records, meta, out_dir, stem)
    _session["written"] = paths
    _session["targets"] = _report.evaluate_targets(records, meta)
    _session["summary"] = _report.summary(records, meta)
    _session["busy"] = meta["busy"]


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if _session.get("summary"):
        tr.section("barkgpt benchmarks: same-run speed-ups")
        if _session.get("busy"):
            tr.write_line(f"WARNING: the machine was busy ({_session['busy']}): timings are unreliable")
        for line in _session["summary"]:
            tr.write_line(line)
    if _session.get("written"):
        md = next((p for p in _session["written"] if p.endswith(".md")), _session["written"][0])
        targets = [t for t in _session.get("targets", []) if t["result"] in ("PASS", "FAIL")]
        if targets:
            met = sum(t["result"] == "PASS" for t in targets)
            tr.write_line(f"\nperformance targets for this device: {met} of {len(targets)} met (a finding, not a "
                          f"test result; the targets and their values are in {os.path.relpath(md)})")
        tr.write_line("results: " + ", ".join(os.path.relpath(p) for p in _session["written"]))
