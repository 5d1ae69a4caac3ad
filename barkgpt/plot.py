"""Loss charts of training runs (PNG), drawn from their ``metrics.jsonl``.

``barkgpt plot RUN [RUN ...]`` and :func:`plot_runs` put the training and validation loss of one
or more runs on one chart, against optimizer steps and against tokens; every training run writes
its own ``loss.png`` through :func:`write_loss_png`. Only matplotlib's object API is used (a
``Figure`` on an Agg canvas, no pyplot): drawing never changes the caller's matplotlib backend or
global state.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

LOSS_PNG = "loss.png"


class PlotError(ValueError):
    """A run cannot be plotted (no metrics, unreadable files); the message says which and why."""


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.4):
    """(figure, axes list) on an Agg canvas, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` through a temporary file renamed over it (a reader never sees a
    half-written PNG, two writers never interleave)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_run(run_dir: str) -> Dict:
    """A run's curves: {"name", "train": [(step, loss)], "val": [(step, val_loss)],
    "tokens_per_step": int or None, "optimal_loss": float or None} from its metrics.jsonl
    (and train_config.json / config.json for the tokens per step). Lines cut by a crash are skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir!r} is not a run directory (no such directory)")
    if not os.path.exists(path):
        raise PlotError(f"{run_dir!r} has no metrics.jsonl: not a training run directory, or a run "
                        f"that has not logged yet")
    train, val, optimal = {}, {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if not isinstance(e, dict) or "step" not in e:
                continue
            if "loss" in e and _finite(e["loss"]):
                train[int(e["step"])] = float(e["loss"])  # a resumed run logs a step again: last wins
            if "val_loss" in e and _finite(e["val_loss"]):
                val[int(e["step"])] = float(e["val_loss"])
            if e.get("optimal_loss") is not None:
                optimal = float(e["optimal_loss"])
    return {"name": os.path.basename(os.path.normpath(run_dir)), "train": sorted(train.items()),
            "val": sorted(val.items()), "tokens_per_step": tokens_per_step(run_dir), "optimal_loss": optimal}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def tokens_per_step(run_dir: str) -> Optional[int]:
    """Tokens per optimizer step of a run (batch x grad_accum x processes x block), from its
    train_config.json and model config; None when they cannot be read."""
    try:
        with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
            tc = json.load(f)
        block = None
        if isinstance(tc.get("model"), dict):
            block = tc["model"].get("block_size")
        if block is None and os.path.exists(os.path.join(run_dir, "config.json")):
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                block = json.load(f).get("block_size")
        if block is None:
            from .config import PRESETS

            block = PRESETS[tc["preset"]]["config"]["block_size"]
        world = 1
        if os.path.isdir(os.path.join(run_dir, "checkpoints")):
            world = _world_size(run_dir)
        return int(tc["batch_size"]) * int(tc.get("grad_accum", 1)) * world * int(block)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _world_size(run_dir: str) -> int:
    """Processes of a run: its latest checkpoint's state records it (1 if it cannot be read)."""
    try:
        d = os.path.join(run_dir, "checkpoints")
        steps = sorted((n for n in os.listdir(d) if n.startswith("step_")),
                       key=lambda n: int(n.split("_")[1]) if n.split("_")[1].isdigit() else -1)
        with open(os.path.join(d, steps[-1], "state.json"), encoding="utf-8") as f:
            return int(json.load(f).get("world_size", 1))
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return 1


def _smooth(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over ``window`` points (the first points over what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw_runs(runs: Sequence[Dict], axes, by=("step", "tokens"), smooth: Optional[int] = None) -> None:
    """Draw each run's training loss (line) and validation loss (dots joined) on each of ``axes``,
    one per entry of ``by`` ("step" or "tokens")."""
    from matplotlib import colormaps

    cmap = colormaps["viridis" if len(runs) > 10 else "tab10"]
    optimal = {r["optimal_loss"] for r in runs if r.get("optimal_loss") is not None}
    for ax, x in zip(axes, by):
        for i, r in enumerate(runs):
            color = cmap(i / max(len(runs) - 1, 1)) if len(runs) > 10 else cmap(i % 10)
            scale = 1
            if x == "tokens":
                if not r["tokens_per_step"]:
                    continue
                scale = r["tokens_per_step"]
            label = r["name"] if len(runs) > 1 else None
            if r["train"]:
                steps, losses = zip(*r["train"])
                w = smooth if smooth is not None else max(1, len(losses) // 50)
                ax.plot([s * scale for s in steps], _smooth(list(losses), w), color=color, alpha=0.55,
                        lw=1.2, label=(label + " train") if label and len(runs) <= 4 else None)
            if r["val"]:
                steps, losses = zip(*r["val"])
                ax.plot([s * scale for s in steps], losses, "o-", color=color, ms=3.5, lw=1.5,
                        label=(label + (" val" if len(runs) <= 4 else "")) if label else None)
        for o in optimal:
            ax.axhline(o, color="k", ls="--", lw=0.8, label="corpus optimum")
        ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    if len(runs) == 1 and axes:  # one run: the legend says which line is which
        axes[0].plot([], [], color="C0", alpha=0.55, label="train (smoothed)")
        axes[0].plot([], [], "o-", color="C0", ms=3.5, label="validation")
    if axes and axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, ncol=1 if len(runs) <= 8 else 2)


def plot_runs(run_dirs: Sequence[str], out: Optional[str] = None, title: Optional[str] = None,
              log_y: bool = False) -> str:
    """Training and validation loss of ``run_dirs`` against step (left) and tokens (right) on one
    chart; returns the PNG's path (default: ``loss.png`` in the run directory for one run,
    ``loss-compare.png`` in the current directory for several)."""
    if not run_dirs:
        raise PlotError("give at least one run directory")
    if not have_matplotlib():
        raise PlotError("plotting needs matplotlib: pip install matplotlib")
    runs = [read_run(d) for d in run_dirs]
    empty = [d for d, r in zip(run_dirs, runs) if not r["train"] and not r["val"]]
    if len(empty) == len(runs):
        raise PlotError(f"nothing to plot: {', '.join(map(repr, empty))} logged no loss yet")
    if out is None:
        out = os.path.join(run_dirs[0], LOSS_PNG) if len(run_dirs) == 1 else "loss-compare.png"
    fig, axes = new_figure(ncols=2)
    draw_runs(runs, axes)
    for ax in axes:
        if log_y:
            ax.set_yscale("log")
    fig.suptitle(title or (runs[0]["name"] if len(runs) == 1 else f"{len(runs)} runs"), fontsize=10)
    return save_figure(fig, out)


def write_loss_png(run_dir: str) -> Optional[str]:
    """The training loop's hook: (re)draw ``run_dir/loss.png``. Skipped quietly without matplotlib
    or before anything was logged; any other failure is a warning, never the end of a training run."""
    if not have_matplotlib():
        return None
    try:
        run = read_run(run_dir)
        if not run["train"] and not run["val"]:
            return None
        return plot_runs([run_dir], os.path.join(run_dir, LOSS_PNG))
    except Exception as e:  # noqa: BLE001 - a chart must never cost the run
        warnings.warn(f"barkgpt: could not draw {os.path.join(run_dir, LOSS_PNG)}: {e}", stacklevel=2)
        return None
