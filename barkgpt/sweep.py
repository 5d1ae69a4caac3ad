"""Sweeps: train a grid of model configs on the same data with the same budget, and compare them.

``barkgpt.sweep(out, grid={"n_layer": [1, 2], "n_embd": [32, 64]}, flops=1e12)`` (or
``barkgpt sweep``) plans every run up front (a bad combination or budget is an error before
anything trains), trains each run as an ordinary run directory under ``out/runs/`` through
:func:`barkgpt.train` (loadable with ``barkgpt.load``, resumable with ``resume=True``), then writes
``results.md`` / ``.csv`` / ``.json`` and charts with a fitted power law ``L = E + A / N^alpha``.

Restartable and shareable: the plan is saved in ``out/sweep.json``; a finished run has
``sweep_result.json`` in its directory and is skipped; a half-finished one resumes from its last
checkpoint (bitwise, as ``--resume``). A process trains a run only while it holds an exclusive
lock on ``out/locks/<run>.lock`` (``flock``: released by the kernel if the process dies), so any
number of processes, on one machine or on several sharing the directory over a file system with
working locks (local disks, NFSv4), train each run once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from . import perf
from . import plot as plots
from .config import PRESETS, ConfigError, GPTConfig
from .data import DataError, load_dataset
from .model import BarkGPT
from .train import TrainConfig, TrainingError, resolve_dtype, train

SWEEP_FILE = "sweep.json"
RESULT_FILE = "sweep_result.json"  # in a run directory: the run is finished
RUNS_DIR, LOCKS_DIR = "runs", "locks"
BUDGET_KINDS = ("steps", "tokens", "flops")

# Training settings a grid (or a spec's "train") may set; the budget, data, output and per-machine
# settings (device, backend, compile) are the sweep's.
GRID_TRAIN_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
                   "batch_size", "grad_accum", "seed", "dtype")
SPEC_TRAIN_KEYS = GRID_TRAIN_KEYS + ("eval_every", "save_every", "keep_last", "deterministic")
MACHINE_KEYS = ("device", "backend", "compile")
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig))


class SweepError(ValueError):
    """A sweep cannot be planned or run (bad grid, budget, spec, or a different sweep in --out)."""


@dataclass
class Run:
    """One planned run: its grid values, its full TrainConfig and what the budget gives it."""

    index: int
    name: str
    settings: Dict[str, Any]  # the grid's (or the spec's runs entry's) values for this run
    train: Dict[str, Any]  # TrainConfig fields (model given in full, steps from the budget)
    params: int
    non_embedding_params: int
    flops_per_token: int
    tokens_per_step: int

    @property
    def steps(self) -> int:
        return self.train["steps"]

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def train_flops(self) -> float:
        return float(self.flops_per_token) * self.tokens


@dataclass
class PowerLawFit:
    """``y = E + A / x^alpha`` fitted by least squares; ``warnings`` say when not to trust it."""

    E: float
    A: float
    alpha: float
    r2: float
    rmse: float
    n: int
    warnings: List[str] = field(default_factory=list)

    def __call__(self, x):
        import numpy as np

        return self.E + self.A / np.asarray(x, dtype=float) ** self.alpha

    def formula(self, var: str = "N") -> str:
        return f"L = {self.E:.4g} + {self.A:.4g} / {var}^{self.alpha:.4g}"


@dataclass
class SweepResult:
    out_dir: str
    runs: List[Dict[str, Any]]  # one record per finished run (sweep_result.json), in run order
    pending: List[str]  # runs not finished (running elsewhere, or not selected by only=)
    fit_params: Optional[PowerLawFit]
    fit_compute: Optional[PowerLawFit]
    files: Dict[str, str]  # "md", "csv", "json", and the charts that were drawn


# ---- grid and spec parsing ------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A grid value from the command line: int, float, true/false, null/none, else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``["n_layer=1,2,4", "n_embd=32,64"]`` -> ``{"n_layer": [1, 2, 4], "n_embd": [32, 64]}``."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SweepError(f"grid entry {item!r} is not KEY=V1,V2,...; e.g. n_layer=1,2,4")
        if key in grid:
            raise SweepError(f"grid key {key!r} is given twice; list all its values once: {key}=V1,V2,...")
        parts = [v for v in values.split(",")]
        if not values.strip() or any(not p.strip() for p in parts):
            raise SweepError(f"grid entry {item!r} has an empty value; give {key}=V1,V2,...")
        grid[key] = [parse_value(p) for p in parts]
    return grid


def load_spec(path: str) -> Dict[str, Any]:
    """A sweep spec from a JSON or TOML file (see :func:`sweep` for its keys)."""
    if not os.path.isfile(path):
        raise SweepError(f"spec file {path!r} does not exist" if not os.path.exists(path)
                         else f"spec file {path!r} is not a file")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                spec = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json and tomllib errors are ValueErrors
        raise SweepError(f"spec file {path!r} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: "
                         f"{e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"spec file {path!r} must hold an object (a table), got {type(spec).__name__}")
    return spec


def normalize_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Checks a spec's keys and types and fills defaults; the canonical form saved in sweep.json."""
    known = ("data", "preset", "grid", "runs", "budget", "train")
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise SweepError(f"unknown sweep spec key(s) {unknown}; known: {list(known)}")
    data = spec.get("data", "bark")
    if not isinstance(data, str) or not data:
        raise SweepError(f"data must be 'bark' or a file path, got {data!r}")
    preset = spec.get("preset", "bark")
    if preset not in PRESETS:
        raise SweepError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"grid must map keys to lists of values, got {type(grid).__name__}")
    allowed = set(MODEL_KEYS) | set(GRID_TRAIN_KEYS) | {"preset"}
    for k, v in grid.items():
        if k not in allowed:
            hint = " (the budget is --steps/--tokens/--flops, the same for every run)" if k in BUDGET_KINDS else ""
            raise SweepError(f"unknown grid key {k!r}{hint}; a grid varies GPTConfig fields "
                             f"({', '.join(MODEL_KEYS)}), preset, or training settings ({', '.join(GRID_TRAIN_KEYS)})")
        if not isinstance(v, list) or not v:
            raise SweepError(f"grid {k!r} must be a non-empty list of values, got {v!r}")
        if len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            raise SweepError(f"grid {k!r} lists a value twice: {v}")
    runs = spec.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise SweepError("runs must be a list of objects of GPTConfig fields / preset / training settings")
    for r in runs:
        bad = sorted(set(r) - allowed - {"name"})
        if bad:
            raise SweepError(f"unknown key(s) {bad} in runs entry {r}; allowed: GPTConfig fields, preset, "
                             f"name, {', '.join(GRID_TRAIN_KEYS)}")
    if not grid and not runs:
        raise SweepError("the sweep has no runs: give a grid (e.g. --grid n_layer=1,2 n_embd=32,64) "
                         "and/or a spec file with runs")
    budget = spec.get("budget") or {}
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KINDS:
        raise SweepError(f"give exactly one budget per run: steps, tokens or flops (e.g. --flops 1e12); "
                         f"got {budget or 'none'}")
    (kind, value), = budget.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SweepError(f"the {kind} budget must be a positive finite number, got {value!r}")
    if kind in ("steps", "tokens") and value != int(value):
        raise SweepError(f"the {kind} budget must be a whole number, got {value!r}")
    budget = {kind: int(value) if kind != "flops" else float(value)}
    tr = dict(spec.get("train") or {})
    bad = sorted(set(tr) - set(SPEC_TRAIN_KEYS))
    if bad:
        raise SweepError(f"unknown or per-sweep training setting(s) {bad} in train; allowed: "
                         f"{', '.join(SPEC_TRAIN_KEYS)} (device/backend are options of the process)")
    return {"data": data if data == "bark" else os.path.abspath(data), "preset": preset, "grid": grid,
            "runs": runs, "budget": budget, "train": tr}


# ---- planning -------------------------------------------------------------------------------------

def _run_name(index: int, settings: Dict[str, Any]) -> str:
    given = settings.get("name")
    body = given if given else "-".join(f"{k}={v}" for k, v in settings.items()) or "base"
    body = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", str(body))[:80]
    return f"{index:03d}-{body}"


def plan(spec: Dict[str, Any], skip_invalid: bool = False, say=None) -> List[Run]:
    """Every run of a (normalized) spec, checked before anything trains: model configs, training
    settings, data, and that the budget gives each run at least one step. All the problems are
    reported together (or, with ``skip_invalid``, the invalid runs are left out, each named)."""
    points: List[Dict[str, Any]] = []
    if spec["grid"]:
        keys = list(spec["grid"])
        for combo in itertools.product(*(spec["grid"][k] for k in keys)):
            points.append(dict(zip(keys, combo)))
    points.extend(dict(r) for r in spec["runs"])
    budget_kind, budget = next(iter(spec["budget"].items()))

    datasets: Dict[int, Any] = {}

    def dataset_for(block_size: int):
        if block_size not in datasets:
            datasets[block_size] = load_dataset(spec["data"], block_size)
        return datasets[block_size]

    runs, problems = [], []
    for i, point in enumerate(points):
        settings = {k: v for k, v in point.items() if k != "name"}
        label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "the base config"
        try:
            preset = settings.get("preset", spec["preset"])
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
            model = dict(PRESETS[preset]["config"])
            model.update({k: v for k, v in settings.items() if k in MODEL_KEYS})
            cfg = GPTConfig(**model)
            data = dataset_for(cfg.block_size)
            if data.vocab_size > cfg.vocab_size and "vocab_size" not in settings:
                cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)  # the data's vocabulary
            elif data.vocab_size > cfg.vocab_size:
                raise ConfigError(f"vocab_size {cfg.vocab_size} is below the data's vocabulary {data.vocab_size}")
            tr = dict(spec["train"])
            tr.update({k: v for k, v in settings.items() if k in GRID_TRAIN_KEYS})
            tc = TrainConfig(preset=preset, model=cfg.to_dict(), data=spec["data"], **tr)
            tc.validate()
            with torch.device("meta"):
                m = BarkGPT(cfg, backend="torch")
            fpt = m.flops_per_token()
            if tc.batch_size is None:  # the batch a training run would take (lr and warmup are its to fill)
                tc.batch_size = tc.defaults()["batch_size"]
            tokens_per_step = tc.batch_size * tc.grad_accum * cfg.block_size
            if budget_kind == "steps":
                steps = budget
            elif budget_kind == "tokens":
                steps = budget // tokens_per_step
                if steps < 1:
                    raise SweepError(f"the token budget {budget:,} is less than one step of {tokens_per_step:,} "
                                     f"tokens (batch_size x grad_accum x block_size)")
            else:
                steps = int(budget // (fpt * tokens_per_step))
                if steps < 1:
                    raise SweepError(f"the FLOP budget {budget:.3g} is less than one step ({fpt * tokens_per_step:.3g} "
                                     f"FLOPs: {fpt:,} per token x {tokens_per_step:,} tokens)")
            tc.steps = steps
            if "eval_every" not in spec["train"]:
                tc.eval_every = max(1, steps // 10)  # about ten points on each loss curve
            if "save_every" not in spec["train"]:
                tc.save_every = max(1, steps // 5)  # a kill loses at most a fifth of a run
            if "keep_last" not in spec["train"]:
                tc.keep_last = 1
            tc.validate()
        except (ConfigError, TrainingError, SweepError, TypeError) as e:
            problems.append(f"run {i} ({label}): {e}")
            continue
        except DataError as e:
            raise SweepError(f"the data cannot be used: {e}") from None
        runs.append(Run(index=i, name=_run_name(i, point), settings=settings,
                        train=dataclasses.asdict(tc), params=m.num_params(),
                        non_embedding_params=m.num_params(non_embedding=True),
                        flops_per_token=fpt, tokens_per_step=tokens_per_step))
    if problems and not skip_invalid:
        raise SweepError(f"{len(problems)} of {len(points)} runs are invalid (nothing was trained); fix or "
                         f"remove them, or pass --skip-invalid (skip_invalid=True) to leave them out:\n  "
                         + "\n  ".join(problems))
    if problems and say is not None:
        for p in problems:
            say(f"sweep: skipping invalid {p}")
    if not runs:
        raise SweepError("no valid runs in the sweep:\n  " + "\n  ".join(problems))
    return runs


# ---- the sweep directory -----------------------------------------------------------------------------

def _atomic_json(path: str, obj: Any) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _open_sweep(out: str, spec: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The spec of the sweep in ``out``: created from ``spec`` if new (atomically: of two processes
    starting together one creates it, the other reads it), else checked against ``spec``."""
    path = os.path.join(out, SWEEP_FILE)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SweepError(f"--out {out!r} is a file, not a directory")
    saved = None
    if os.path.exists(path):
        saved = _read_sweep_file(path)
    if spec is None:
        if saved is None:
            raise SweepError(f"{out!r} holds no sweep ({SWEEP_FILE} missing): give a grid or spec and a budget "
                             f"to start one")
        return saved
    if saved is None:
        os.makedirs(out, exist_ok=True)
        # key order kept: the grid's order names the runs
        data = (json.dumps({"version": 1, "spec": spec}, indent=2) + "\n").encode()
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: fails if another process created it first
            created = True
        except FileExistsError:
            created = False
        except OSError:  # no hard links on this file system: exclusive create instead
            created = False
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                created = True
            except FileExistsError:
                pass
        finally:
            os.remove(tmp)
        if created:
            return spec
        saved = _read_sweep_file(path)
    if saved != spec:
        diffs = [k for k in spec if spec[k] != saved.get(k)]
        raise SweepError(f"{out!r} holds another sweep (its {', '.join(diffs)} differ{'s' if len(diffs) == 1 else ''}: "
                         f"{ {k: saved.get(k) for k in diffs} }); run it with no grid or budget to continue "
                         f"it, or choose another --out")
    return saved


def _read_sweep_file(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return normalize_spec(d["spec"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SweepError(f"cannot read {path!r} ({e}); it is not a barkgpt sweep file") from None


def run_dir(out: str, run: Run) -> str:
    return os.path.join(out, RUNS_DIR, run.name)


def _read_result(out: str, run: Run) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(run_dir(out, run), RESULT_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class RunLock:
    """An exclusive, non-blocking lock on ``out/locks/<run>.lock``, held while the run trains. The
    kernel drops it when the process ends, however it ends: a killed sweep never leaves a run claimed."""

    def __init__(self, out: str, run: Optional[Run], name: Optional[str] = None):
        self.path = os.path.join(out, LOCKS_DIR, (name or run.name) + ".lock")
        self.f = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock (``wait``: block until it is free); False if another process holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt

                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            f.close()
            return False
        self.f = f
        return True

    def release(self) -> None:
        if self.f is not None:
            self.f.close()  # closing the descriptor drops the lock
            self.f = None


def run_status(out: str, run: Run) -> str:
    """"done", "failed", "running" (another process holds its lock), "partial" (has a checkpoint) or "pending"."""
    rec = _read_result(out, run)
    if rec is not None:
        return "failed" if rec.get("status") == "failed" else "done"
    if not os.path.isdir(os.path.join(out, LOCKS_DIR)):  # no process ever claimed a run here
        return "partial" if ckpt.latest_checkpoint(run_dir(out, run)) else "pending"
    lock = RunLock(out, run)
    if not lock.acquire():
        return "running"
    lock.release()
    return "partial" if ckpt.latest_checkpoint(run_dir(out, run)) else "pending"


def _wall_seconds(directory: str) -> float:
    """Training time of a run over all its attempts, from metrics.jsonl: each attempt's clock
    (elapsed_sec) restarts at 0, so the run's time is the sum of each attempt's last reading."""
    total, last = 0.0, 0.0
    try:
        with open(os.path.join(directory, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if "elapsed_sec" not in e:
                    continue
                t = float(e["elapsed_sec"])
                if t < last:
                    total += last
                last = t
    except OSError:
        return 0.0
    return total + last


# ---- the power-law fit -------------------------------------------------------------------------------

def fit_power_law(x: Sequence[float], y: Sequence[float], alpha_range: Tuple[float, float] = (1e-3, 4.0)
                  ) -> PowerLawFit:
    """Least-squares fit of ``y = E + A / x^alpha`` with E >= 0, A >= 0, alpha in ``alpha_range``.

    For a fixed alpha the model is linear in (E, A), so those are solved exactly and only alpha is
    searched: a log-spaced scan, then golden-section refinement around the best (variable
    projection; no scipy needed). ``warnings`` flag too few points, a poor fit, and parameters
    that sit on a bound (the data do not pin them down)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D sequences of the same length")
    if len(x) < 3:
        raise ValueError(f"a power law E + A / x^alpha has 3 parameters: it needs at least 3 points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(x > 0) and np.all(np.isfinite(y))):
        raise ValueError("x must be positive and finite, y finite")
    x0 = float(np.exp(np.mean(np.log(x))))  # scale: x / x0 near 1 keeps x^-alpha well conditioned
    xs = x / x0

    def solve(alpha: float):
        z = xs ** -alpha
        zc, yc = z - z.mean(), y - y.mean()
        denom = float(zc @ zc)
        A = float(zc @ yc) / denom if denom > 0 else 0.0
        E = float(y.mean() - A * z.mean())
        if A < 0:  # no decrease: a constant
            A, E = 0.0, float(y.mean())
        if E < 0:  # the floor below zero: pin it at 0 and fit the slope alone
            E = 0.0
            A = max(0.0, float(z @ y) / float(z @ z))
        r = E + A * z - y
        return float(r @ r), E, A

    lo, hi = math.log(alpha_range[0]), math.log(alpha_range[1])
    grid = np.linspace(lo, hi, 400)
    sse = [solve(math.exp(g))[0] for g in grid]
    k = int(np.argmin(sse))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = solve(math.exp(c))[0], solve(math.exp(d))[0]
    for _ in range(200):
        if b - a < 1e-12:
            break
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = solve(math.exp(c))[0]
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = solve(math.exp(d))[0]
    la = (a + b) / 2
    s, E, A_s = solve(math.exp(la))
    if sse[k] < s:  # the scan's best point beat the refinement (a flat or kinked objective)
        la = grid[k]
        s, E, A_s = solve(math.exp(la))
    alpha = math.exp(la)
    A = A_s * x0 ** alpha
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - s / sst if sst > 0 else (1.0 if s == 0 else 0.0)
    warn = []
    n = len(x)
    if n < 5:
        warn.append(f"only {n} points for 3 parameters: the fit passes near any {n} points; "
                    f"treat E, A and alpha as rough")
    if r2 < 0.9:
        warn.append(f"poor fit (R^2 = {r2:.3f}): the points do not follow E + A / x^alpha")
    if A_s == 0.0:
        warn.append("the loss does not fall with x: A = 0, alpha is meaningless")
    elif E == 0.0:
        warn.append("the floor E hit 0 (its bound): the data do not pin down an irreducible loss")
    if A_s > 0 and (la - lo < 1e-3 or hi - la < 1e-3):
        warn.append(f"alpha hit its search bound {alpha_range}: the data do not pin it down")
    if float(np.max(x) / np.min(x)) < 4:
        warn.append(f"x spans only {float(np.max(x) / np.min(x)):.2g}x: too narrow a range to fit a power law")
    return PowerLawFit(E=E, A=A, alpha=alpha, r2=r2, rmse=math.sqrt(s / n), n=n, warnings=warn)


def compute_frontier(curves: Sequence[Tuple[Sequence[float], Sequence[float]]]) -> Tuple[List[float], List[float]]:
    """The lowest loss reached at each compute by any run: the points of all (compute, loss) curves
    that no point at less or equal compute beats, over the compute range every curve covers (below
    it, whichever run happens to log first would be "the frontier", however bad)."""
    curves = [(cs, ls) for cs, ls in curves if len(cs)]
    if not curves:
        return [], []
    lo = max(min(cs) for cs, _ in curves)
    pts = sorted((c, l) for cs, ls in curves for c, l in zip(cs, ls) if c >= lo)
    xs, ys, best = [], [], math.inf
    for c, l in pts:
        if l < best:
            xs.append(c)
            ys.append(l)
            best = l
    return xs, ys


# ---- running --------------------------------------------------------------------------------------

def _fmt_time(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Progress:
    """Which run of how many, and an ETA over the whole sweep: FLOPs still to train over the FLOP
    rate measured so far in this process (so runs of any size count for what they cost)."""

    def __init__(self, todo: List[Run], total_runs: int, say, bar: bool):
        self.todo_flops = sum(r.train_flops for r in todo)
        self.done_flops = 0.0
        self.total_runs = total_runs
        self.say = say
        self.t0 = time.perf_counter()
        self.timed = 0.0  # seconds spent training in this process
        self.run_t0 = None
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.todo_flops, unit="FLOP", unit_scale=True, dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5, smoothing=0.0)

    def eta(self, extra_done: float = 0.0) -> Optional[float]:
        done = self.done_flops + extra_done
        elapsed = time.perf_counter() - self.t0
        if done <= 0 or elapsed <= 0:
            return None
        return (self.todo_flops - done) * elapsed / done

    def start(self, run: Run, position: int, start_step: int) -> None:
        self.run_t0 = time.perf_counter()
        self.run_start_step = start_step
        self.run = run
        eta = self.eta()
        what = f"resuming at step {start_step}" if start_step else "starting"
        self.say(f"sweep: run {position}/{self.total_runs} {run.name}: {run.params:,} params, {run.steps:,} steps, "
                 f"{run.train_flops:.3g} FLOPs, {what}" + (f"; sweep ETA {_fmt_time(eta)}" if eta is not None else ""))
        if self.bar is not None:
            self.bar.set_description(f"run {position}/{self.total_runs}")

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(float(self.run.flops_per_token) * self.run.tokens_per_step)

    def finish(self, run: Run, result: Dict[str, Any], start_step: int) -> None:
        self.done_flops += run.train_flops * (run.steps - start_step) / max(run.steps, 1)
        eta = self.eta()
        vl = result.get("final_val_loss")
        self.say(f"sweep: finished {run.name} in {_fmt_time(time.perf_counter() - self.run_t0)}"
                 + (f", val loss {vl:.4f}" if vl is not None else "")
                 + (f"; sweep ETA {_fmt_time(eta)}" if eta is not None and eta > 0 else ""))

    def skip(self, run: Run, why: str) -> None:
        self.todo_flops -= run.train_flops
        if self.bar is not None:
            self.bar.total = self.todo_flops
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_run(out: str, run: Run, machine: Dict[str, Any], progress: _Progress, position: int,
               on_step, log) -> Dict[str, Any]:
    d = run_dir(out, run)
    latest = ckpt.latest_checkpoint(d)
    start_step = 0
    if latest is not None:
        with open(os.path.join(latest, "state.json"), encoding="utf-8") as f:
            start_step = int(json.load(f).get("step", 0))
    progress.start(run, position, start_step)

    def hook(step, loss):
        progress.step(step)
        if on_step is not None:
            on_step(run, step, loss)

    common = dict(progress=False, sample=False, log=log, on_step=hook, **machine)
    if latest is not None:
        # exactly as `barkgpt train --resume`: the checkpoint holds the run's settings
        res = train(out=d, resume=True, **common)
    else:
        tc = TrainConfig(**{k: v for k, v in run.train.items() if k not in ("out",)})
        tc.out = d
        res = train(tc, **common)
    record = _record(out, run, res, machine)
    _atomic_json(os.path.join(d, RESULT_FILE), record)
    progress.finish(run, record, start_step)
    return record


def _record(out: str, run: Run, res, machine: Dict[str, Any]) -> Dict[str, Any]:
    d = run_dir(out, run)
    wall = _wall_seconds(d)
    tps = run.tokens / wall if wall > 0 else None
    dev = next(res.model.parameters()).device
    peak = perf.peak_flops(dtype=resolve_dtype(run.train["dtype"], dev), device=dev)  # the matmuls' dtype
    mfu = perf.mfu(run.flops_per_token, tps, peak) if tps else None
    gap = None
    if res.optimal_loss and res.final_val_loss is not None:
        gap = res.final_val_loss / res.optimal_loss - 1
    return {"index": run.index, "name": run.name, "settings": run.settings, "dir": os.path.relpath(d, out),
            "n_layer": res.model.config.n_layer, "n_head": res.model.config.n_head,
            "n_embd": res.model.config.n_embd, "block_size": res.model.config.block_size,
            "params": run.params, "non_embedding_params": run.non_embedding_params,
            "flops_per_token": run.flops_per_token, "steps": run.steps, "tokens": run.tokens,
            "train_flops": run.train_flops, "wall_sec": wall, "tokens_per_sec": tps,
            "mfu": mfu, "peak_flops": peak, "peak_source": perf.peak_source(dev),
            "final_val_loss": res.final_val_loss, "best_val_loss": res.best_val_loss,
            "final_val_bpb": res.final_val_bpb,  # text corpora (bits per byte of the held-out text)
            "optimal_loss": res.optimal_loss, "gap_to_optimum": gap,
            "device": perf.device_name(dev), "backend": res.model.resolved_backend(),
            "val_history": res.val_history}


def _failure_record(out: str, run: Run, error: BaseException) -> Dict[str, Any]:
    rec = {"index": run.index, "name": run.name, "settings": run.settings, "dir": os.path.relpath(run_dir(out, run), out),
           "status": "failed", "error": " ".join(str(error).split()) or type(error).__name__,
           "params": run.params, "non_embedding_params": run.non_embedding_params,
           "flops_per_token": run.flops_per_token, "steps": run.steps, "tokens": run.tokens,
           "train_flops": run.train_flops, "wall_sec": _wall_seconds(run_dir(out, run)), "val_history": []}
    for k in ("tokens_per_sec", "mfu", "peak_flops", "peak_source", "final_val_loss", "best_val_loss", "final_val_bpb",
              "optimal_loss", "gap_to_optimum", "device", "backend"):
        rec[k] = None
    return rec


def sweep(out: str, grid: Optional[Dict[str, List[Any]]] = None, *, runs: Optional[List[Dict[str, Any]]] = None,
          data: Optional[str] = None, preset: Optional[str] = None, steps: Optional[int] = None,
          tokens: Optional[int] = None, flops: Optional[float] = None, train_settings: Optional[Dict[str, Any]] = None,
          spec: Optional[Dict[str, Any]] = None, only: Optional[Sequence[int]] = None, skip_invalid: bool = False,
          device: str = "auto", backend: Optional[str] = None, compile: bool = False, progress: bool = True,
          log: Optional[Callable[[str], None]] = None,
          on_step: Optional[Callable[[Run, int, float], None]] = None) -> SweepResult:
    """Train every run of a grid of model configs with the same data and budget; compare them.

    ``grid``: {key: [values]} over GPTConfig fields, ``preset`` and training settings
    (``lr``, ``batch_size`` ...), crossed; ``runs``: explicit extra runs (dicts of the same keys,
    optionally a ``name``). ``preset`` (default "bark") is the base config the grid overrides;
    ``data`` ("bark" or a text / token file). Budget, one of: ``steps``, ``tokens`` or ``flops``
    per run (steps derived from ``flops_per_token``: equal compute for every size).
    ``train_settings``: training options shared by all runs (lr, batch_size, eval_every ...).
    ``spec``: all of the above as one dict (the form of a JSON/TOML spec file), instead.

    With none of grid/runs/spec/budget the sweep already in ``out`` continues. ``only``: train
    just these run indices (``sweep_list`` shows them), e.g. one per job of a Slurm array.
    ``device``/``backend``/``compile`` may differ between the processes sharing a sweep.
    ``on_step(run, step, loss)`` is called after every optimizer step.

    Returns the results (also written to ``out``: results.md/.csv/.json and PNG charts)."""
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = os.path.abspath(out)
    if spec is not None and any(v is not None for v in (grid, runs, data, preset, steps, tokens, flops,
                                                        train_settings)):
        raise SweepError("give either spec=... or the grid/runs/data/preset/budget arguments, not both")
    if spec is None and any(v is not None for v in (grid, runs, data, preset, steps, tokens, flops, train_settings)):
        budgets = {k: v for k, v in (("steps", steps), ("tokens", tokens), ("flops", flops)) if v is not None}
        if len(budgets) != 1:
            raise SweepError(f"give exactly one budget per run: steps, tokens or flops (got "
                             f"{', '.join(budgets) or 'none'})")
        spec = {"data": data or "bark", "preset": preset or "bark", "grid": grid or {}, "runs": runs or [],
                "budget": budgets, "train": train_settings or {}}
    if spec is not None:
        spec = normalize_spec(spec)
        all_runs = plan(spec, skip_invalid=skip_invalid, say=say)  # before anything is written
        spec = _open_sweep(out, spec)
    else:
        spec = _open_sweep(out, None)
        all_runs = plan(spec, skip_invalid=skip_invalid, say=say)
    by_index = {r.index: r for r in all_runs}
    if only is not None:
        bad = [i for i in only if i not in by_index]
        if bad:
            raise SweepError(f"--only {bad}: no such run; the sweep's runs are "
                             f"{', '.join(str(i) for i in sorted(by_index))} (see --list)")
        selected = [by_index[i] for i in sorted(set(only))]
    else:
        selected = all_runs
    machine = {"device": device, "backend": backend, "compile": compile}
    todo = [r for r in selected if _read_result(out, r) is None]
    say(f"sweep {out}: {len(all_runs)} runs, {len(selected) - len(todo)} of {len(selected)} selected already "
        f"done, budget {_budget_text(spec)} per run")
    prog = _Progress(todo, len(all_runs), say, bar=progress)
    try:
        for run in todo:
            lock = RunLock(out, run)
            if not lock.acquire():
                say(f"sweep: {run.name} is being trained by another process; skipping it")
                prog.skip(run, "running")
                continue
            try:
                if _read_result(out, run) is not None:  # finished by another process meanwhile
                    prog.skip(run, "done")
                    continue
                try:
                    _train_run(out, run, machine, prog, run.index + 1, on_step, log if log is not None else say)
                except (TrainingError, torch.cuda.OutOfMemoryError) as e:
                    # this run's own failure (a diverging loss, too big for the device): recorded,
                    # and the sweep goes on; the run's directory keeps its last checkpoint
                    os.makedirs(run_dir(out, run), exist_ok=True)
                    _atomic_json(os.path.join(run_dir(out, run), RESULT_FILE), _failure_record(out, run, e))
                    say(f"sweep: run {run.name} failed: {' '.join(str(e).split())}")
                    prog.skip(run, "failed")
            finally:
                lock.release()
    finally:
        prog.close()
    return write_results(out, spec, all_runs, say)


def _budget_text(spec: Dict[str, Any]) -> str:
    kind, v = next(iter(spec["budget"].items()))
    return f"{v:.3g} FLOPs" if kind == "flops" else f"{v:,} {kind}"


def sweep_list(out: str, spec: Optional[Dict[str, Any]] = None, skip_invalid: bool = False) -> List[Tuple[Run, str]]:
    """The runs of the sweep in ``out`` with their status (done, running, partial, pending). With
    ``spec`` (a new sweep's), its plan is shown without writing anything, checked against the
    sweep already in ``out`` if there is one."""
    out = os.path.abspath(out)
    if spec is not None:
        spec = normalize_spec(spec)
        runs = plan(spec, skip_invalid=skip_invalid)
        if os.path.exists(os.path.join(out, SWEEP_FILE)):
            _open_sweep(out, spec)  # raises if it is another sweep
    else:
        runs = plan(_open_sweep(out, None), skip_invalid=True)
    return [(r, run_status(out, r)) for r in runs]


# ---- results --------------------------------------------------------------------------------------

COLUMNS = [("run", "name"), ("params", "params"), ("non-emb params", "non_embedding_params"),
           ("train FLOPs", "train_flops"), ("tokens", "tokens"), ("steps", "steps"), ("wall", "wall_sec"),
           ("tokens/s", "tokens_per_sec"), ("MFU (measured peak)", "mfu"), ("final val loss", "final_val_loss"),
           ("best val loss", "best_val_loss"), ("final val bits/byte", "final_val_bpb"),
           ("gap to optimum", "gap_to_optimum")]


def _cell(key: str, v) -> str:
    if v is None:
        return "n/a"
    if key in ("params", "non_embedding_params", "tokens", "steps"):
        return f"{v:,}"
    if key == "train_flops":
        return f"{v:.3g}"
    if key == "wall_sec":
        return _fmt_time(v)
    if key == "tokens_per_sec":
        return f"{v:,.0f}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "gap_to_optimum":
        return f"{100 * v:+.2f}%"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_results(out: str, spec: Dict[str, Any], all_runs: List[Run], say=None) -> SweepResult:
    """results.md / .csv / .json and the charts from the runs finished so far. Processes sharing
    the sweep take turns (a lock): the last one in has seen every run finished before it, so a
    slower writer never leaves an older table over a newer one."""
    lock = RunLock(out, None, name="results")
    lock.acquire(wait=True)
    try:
        return _write_results(out, spec, all_runs, say)
    finally:
        lock.release()


def _write_results(out: str, spec: Dict[str, Any], all_runs: List[Run], say=None) -> SweepResult:
    records = [r for r in (_read_result(out, run) for run in all_runs) if r is not None]
    pending = [run.name for run in all_runs if _read_result(out, run) is None]
    fit_n = fit_c = None
    notes: List[str] = []
    pts = [(r["non_embedding_params"], r["final_val_loss"]) for r in records if r["final_val_loss"] is not None]
    if len({p for p, _ in pts}) >= 3:
        try:
            fit_n = fit_power_law([p for p, _ in pts], [l for _, l in pts])
        except ValueError as e:
            notes.append(f"no fit against parameters: {e}")
    else:
        notes.append(f"no fit against parameters: {len({p for p, _ in pts})} distinct sizes (at least 3 needed)")
    curves = [_compute_curve(r, skip_fraction=FRONTIER_SKIP) for r in records]
    fx, fy = compute_frontier(curves)
    if len(fx) >= 3:
        try:
            fit_c = fit_power_law(fx, fy)
        except ValueError as e:
            notes.append(f"no fit against compute: {e}")
    else:
        notes.append("no fit against compute: fewer than 3 points on the compute frontier")

    files = {}
    peak_sources = {r.get("peak_source") for r in records}
    result_json = {"spec": spec, "runs": records, "pending": pending,
                   "fit_params": dataclasses.asdict(fit_n) if fit_n else None,
                   "fit_compute": dataclasses.asdict(fit_c) if fit_c else None,
                   "fit_notes": notes, "mfu_peak_source": sorted(s for s in peak_sources if s)}
    files["json"] = os.path.join(out, "results.json")
    _atomic_json(files["json"], result_json)
    files["csv"] = os.path.join(out, "results.csv")
    keys = ["index", "name"] + [k for r in records for k in r["settings"]]
    keys += [k for _, k in COLUMNS[1:]] + ["peak_flops", "peak_source", "device", "backend"]
    keys = list(dict.fromkeys(keys))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys.append("error")
    w.writerow(keys)
    for r in records:
        w.writerow([r["settings"].get(k, r.get(k)) if k in r["settings"] else r.get(k) for k in keys])
    ckpt.atomic_write_bytes(files["csv"], buf.getvalue().encode())

    charts = {}
    if records and plots.have_matplotlib():
        charts = _charts(out, records, fit_n, fit_c, (fx, fy))
        files.update(charts)
    files["md"] = os.path.join(out, "results.md")
    ckpt.atomic_write_bytes(files["md"], _markdown(spec, records, pending, fit_n, fit_c, notes, charts,
                                                   out).encode())
    if say is not None:
        say(f"sweep: {len(records)} of {len(all_runs)} runs done; results in {files['md']}"
            + (f" ({len(pending)} not finished: {', '.join(pending)})" if pending else ""))
    return SweepResult(out_dir=out, runs=records, pending=pending, fit_params=fit_n, fit_compute=fit_c, files=files)


# The frontier fit leaves out each run's first fifth: warmup and the first fast drop are not the
# regime a power law in compute describes (they make the fit's exponent run to its bound).
FRONTIER_SKIP = 0.2


def _compute_curve(r: Dict[str, Any], skip_fraction: float = 0.0) -> Tuple[List[float], List[float]]:
    """A run's validation curve as (training FLOPs so far, loss), without its first ``skip_fraction``."""
    per_step = float(r["flops_per_token"]) * r["tokens"] / max(r["steps"], 1)
    hist = [h for h in (r.get("val_history") or []) if h["step"] >= skip_fraction * r["steps"]]
    return [h["step"] * per_step for h in hist], [h["val_loss"] for h in hist]


def _drawable(fit: Optional[PowerLawFit]) -> bool:
    """A fit worth drawing: it explains the points (R^2 >= 0.9) and the loss falls (A > 0)."""
    return fit is not None and fit.r2 >= 0.9 and fit.A > 0


def _finish_loss_axes(ax, optimal, xlabel: str, title: str, legend_size: int) -> None:
    """The shared end of the log-log validation-loss charts: the corpus optimum, axes, legend."""
    if optimal:
        ax.axhline(optimal, color="k", ls="--", lw=0.8, label="corpus optimum")
    _log_axes(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)


def _log_axes(ax) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlapping 2x10^11 ...
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())  # losses of 2.0, 3.0, not 2x10^0
    ax.yaxis.set_minor_formatter(NullFormatter())


def _markdown(spec, records, pending, fit_n, fit_c, notes, charts, out) -> str:
    lines = ["# Sweep results", ""]
    data = spec["data"] if spec["data"] == "bark" else os.path.basename(spec["data"])
    lines.append(f"Data: `{data}`; base preset `{spec['preset']}`; budget {_budget_text(spec)} per run; "
                 f"grid {json.dumps(spec['grid'])}" + (f"; {len(spec['runs'])} explicit runs" if spec["runs"] else "")
                 + (f"; training {json.dumps(spec['train'])}" if spec["train"] else "") + ".")
    lines.append("")
    ok = [r for r in records if r.get("status") != "failed"]
    if ok:
        dev = sorted({r["device"] for r in ok})
        src = sorted({r.get("peak_source") or "n/a" for r in ok})
        lines.append(f"Device: {', '.join(dev)}. MFU is against the "
                     + ("peak measured on this machine (a matmul probe, see barkgpt.perf.measured_cpu_peak)"
                        if src == ["measured"] else f"peak ({', '.join(src)})") + ".")
        lines.append("")
    show_gap = any(r.get("gap_to_optimum") is not None for r in records)
    show_bpb = any(r.get("final_val_bpb") is not None for r in records)  # text corpora only
    cols = [(h, k) for h, k in COLUMNS if (show_gap or k != "gap_to_optimum") and (show_bpb or k != "final_val_bpb")]
    lines.append("| " + " | ".join(h for h, _ in cols) + " |")
    lines.append("|" + "|".join("---" if k == "name" else "---:" for _, k in cols) + "|")
    for r in records:
        lines.append("| " + " | ".join(_cell(k, r.get(k)) for _, k in cols) + " |")
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines.append("")
        lines.append(f"Failed ({len(failed)}): " + "; ".join(f"`{r['name']}`: {r['error']}" for r in failed))
    if pending:
        lines.append("")
        lines.append(f"Not finished ({len(pending)}): " + ", ".join(f"`{p}`" for p in pending))
    lines.append("")
    lines.append("## Power-law fits")
    lines.append("")
    for title, fit, var in (("Final validation loss vs non-embedding parameters N", fit_n, "N"),
                            ("Compute frontier (lowest validation loss at each training compute C over all "
                             "runs, each run's first fifth left out)",
                             fit_c, "C")):
        if fit is None:
            continue
        lines.append(f"- {title}: `{fit.formula(var)}` (R^2 {fit.r2:.4f}, RMSE {fit.rmse:.4g}, {fit.n} points)")
        for w in fit.warnings:
            lines.append(f"  - **warning**: {w}")
    for n in notes:
        lines.append(f"- {n}")
    if charts:
        lines.append("")
        lines.append("## Charts")
        lines.append("")
        for key, path in charts.items():
            lines.append(f"![{key}]({os.path.relpath(path, out)})")
    lines.append("")
    return "\n".join(lines)


def _charts(out, records, fit_n, fit_c, frontier) -> Dict[str, str]:
    import numpy as np

    charts = {}
    optimal = next((r["optimal_loss"] for r in records if r.get("optimal_loss")), None)
    done = [r for r in records if r["final_val_loss"] is not None]

    fig, (ax,) = plots.new_figure()
    n = np.array([r["non_embedding_params"] for r in done], dtype=float)
    l = np.array([r["final_val_loss"] for r in done], dtype=float)
    ax.scatter(n, l, color="C0", zorder=3, label="final val loss")
    for r in done:
        ax.annotate(r["name"].split("-", 1)[0], (r["non_embedding_params"], r["final_val_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if _drawable(fit_n):
        xs = np.logspace(np.log10(n.min()) - 0.1, np.log10(n.max()) + 0.1, 200)
        ax.plot(xs, fit_n(xs), "C1-", label=fit_n.formula("N") + f"  (R² {fit_n.r2:.3f})")
    elif fit_n is not None:
        ax.plot([], [], " ", label=f"no power law: best fit R² {fit_n.r2:.2f}" + (", A = 0" if fit_n.A == 0 else ""))
    _finish_loss_axes(ax, optimal, "non-embedding parameters N", "loss vs parameters", legend_size=7)
    charts["loss_vs_params"] = plots.save_figure(fig, os.path.join(out, "loss_vs_params.png"))

    fig, (ax,) = plots.new_figure()
    for i, r in enumerate(records):
        cs, ls = _compute_curve(r)
        if cs:
            ax.plot(cs, ls, "o-", ms=2.5, lw=1, color=f"C{i % 10}", alpha=0.8, label=r["name"])
    fx, fy = frontier
    if _drawable(fit_c):
        xs = np.logspace(np.log10(min(fx)) - 0.05, np.log10(max(fx)) + 0.05, 200)
        ax.plot(xs, fit_c(xs), "k-", lw=1.5, label="frontier fit " + fit_c.formula("C") + f"  (R² {fit_c.r2:.3f})")
    elif fit_c is not None:
        ax.plot([], [], " ", label=f"frontier: no power law (R² {fit_c.r2:.2f})")
    if fx:
        ax.plot(fx, fy, "k+", ms=7, label="frontier points (after each run's first fifth)")
    _finish_loss_axes(ax, optimal, "training compute C (FLOPs)", "loss vs training compute", legend_size=6)
    charts["loss_vs_compute"] = plots.save_figure(fig, os.path.join(out, "loss_vs_compute.png"))

    runs = []
    for r in records:
        try:
            run = plots.read_run(os.path.join(out, r["dir"]))
        except plots.PlotError:
            continue
        run["name"] = r["name"]
        runs.append(run)
    if runs:
        fig, axes = plots.new_figure(ncols=2)
        plots.draw_runs(runs, axes)
        fig.suptitle("all runs: training (smoothed) and validation loss", fontsize=10)
        charts["loss_curves"] = plots.save_figure(fig, os.path.join(out, "loss_curves.png"))
    return charts
