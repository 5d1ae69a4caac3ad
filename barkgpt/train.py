"""Training: AdamW, warmup + cosine, gradient accumulation and clipping, autocast, periodic
validation, atomic checkpoints and exact resume.

``barkgpt.train(...)`` is the Python API; ``barkgpt train`` (cli.py) maps its flags onto
:class:`TrainConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from . import checkpoint as ckpt
from . import perf
from . import distributed
from .config import PRESETS, GPTConfig
from .data import BarkCorpus, load_dataset
from .model import BarkGPT

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# Settings a resumed run may change; everything else must match the checkpoint.
RESUME_MAY_CHANGE = ("steps", "eval_every", "save_every", "keep_last", "log_every", "progress", "sample",
                     "device", "backend", "compile", "on_nonfinite")


class TrainingError(RuntimeError):
    """Training cannot go on (bad settings, a non-finite loss ...); the message says why."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""

    preset: str = "bark"
    model: Optional[Dict[str, Any]] = None  # GPTConfig fields; overrides the preset when given
    vocab_size: Optional[int] = None  # overrides the model's vocab_size (a tokenized corpus's)
    # A Hugging Face GPT-2 directory to fine-tune: its config, weights and tokenizer (barkgpt.load_hf)
    init_from: Optional[str] = None
    data: str = "bark"
    steps: int = 600
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # None: 5% of steps (at most 100)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    seed: int = 1337
    device: str = "auto"
    backend: Optional[str] = None
    dtype: str = "auto"
    out: Optional[str] = None  # None: runs/<preset>, runs/<preset>-2, ... (first free)
    eval_every: int = 100
    save_every: int = 200  # 0: only at the end
    keep_last: int = 3
    log_every: int = 10
    compile: bool = False
    deterministic: bool = False
    on_nonfinite: str = "stop"  # or "skip": drop the step and go on
    progress: bool = True
    sample: bool = True

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                raise TrainingError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")

        for n in ("steps", "batch_size", "grad_accum", "eval_every", "keep_last", "log_every"):
            positive(n)
        if self.vocab_size is not None:
            positive("vocab_size")
        positive("save_every", allow_zero=True)
        if self.warmup_steps is not None:
            positive("warmup_steps", allow_zero=True)
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TrainingError(f"{name} must be a finite number, got {v!r}")
        if not 0 < self.lr < 10:
            raise TrainingError(f"lr must be a positive number below 10, got {self.lr!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainingError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64 - 1:
            raise TrainingError(f"seed must be an integer in [-2**63, 2**64 - 2], got {self.seed!r}")
        if self.model is None and self.preset not in PRESETS:
            raise TrainingError(f"unknown preset {self.preset!r}; presets: {', '.join(sorted(PRESETS))}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainingError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise TrainingError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.weight_decay < 0:
            raise TrainingError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise TrainingError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise TrainingError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.init_from is not None:
            if not isinstance(self.init_from, str) or not self.init_from:
                raise TrainingError(f"init_from must be a directory path, got {self.init_from!r}")
            if self.model is not None or self.vocab_size is not None:
                raise TrainingError("init_from takes the model's config from that directory: drop --config and "
                                    "--vocab-size (model=, vocab_size=)")

    def model_config(self) -> GPTConfig:
        cfg = GPTConfig.from_dict(dict(self.model)) if self.model is not None else GPTConfig.preset(self.preset)
        if self.vocab_size is not None:
            cfg = dataclasses.replace(cfg, vocab_size=self.vocab_size)
        return cfg


@dataclass
class TrainResult:
    model: BarkGPT
    out_dir: str  # the run directory: barkgpt.load(out_dir) gives the final model
    checkpoint: Optional[str]  # the last training checkpoint
    losses: List[float]  # training loss of every step (mean over micro-steps)
    val_history: List[Dict[str, float]]  # {"step", "val_loss"} at each evaluation
    final_val_loss: Optional[float]
    best_val_loss: Optional[float]
    optimal_loss: Optional[float]  # the corpus's best achievable loss, when known (bark)
    tokens_per_sec: float
    sample: Optional[str] = None


# ---- the run, top-down: settings -> setup -> loop -> final save ------------------------------

def train(config: Union[TrainConfig, None] = None, *, resume: bool = False, log=None,
          on_step: Optional[Callable[[int, float], None]] = None, **overrides) -> TrainResult:
    """Train a BarkGPT. Pass a TrainConfig and/or its fields as keyword arguments, e.g.
    ``barkgpt.train(preset="bark", steps=300, out="runs/demo")``. With ``resume=True`` the run in
    ``out`` continues from its latest checkpoint, exactly as if it had never stopped.
    ``log(msg)`` receives progress messages (default: stderr); ``on_step(step, loss)`` is called
    after every optimizer step (an exception from it ends the run, as a crash would).

    Launched by torchrun with several processes, this trains data-parallel (see
    barkgpt/distributed.py): ``batch_size`` is per process, rank 0 logs and writes the files,
    and every rank returns the same result."""
    return _train(distributed.init(), config, resume, log, on_step, overrides)


def _train(world: distributed.World, config, resume, log, on_step, overrides) -> TrainResult:
    cfg = _settings(config, overrides)
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not world.is_main:
        say = lambda msg: None  # noqa: E731  (rank 0 speaks for the run)
    # rank 0 decides (and reads the checkpoint to resume), every rank follows
    cfg, resumed = world.run_on_main(lambda: _open_run(cfg, config, overrides, resume, world.size, say))
    run, state = setup(cfg, world, resumed, say, on_step)
    run_loop(run, state)
    return _finish(run, state)


def _settings(config: Optional[TrainConfig], overrides: Dict[str, Any]) -> TrainConfig:
    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"train() got an unknown option {k!r}; options: "
                            f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
        setattr(cfg, k, v)
    if isinstance(cfg.model, GPTConfig):
        cfg.model = cfg.model.to_dict()
    cfg.validate()
    return cfg


@dataclass
class TrainState:
    """Exactly what a training checkpoint holds: the weights, optimizer and loss scaler, the
    data position and RNG states, the step, the loss and validation histories, the best
    validation loss, and the run's settings, data description and world size. A run resumed
    from it continues bitwise as if it had never stopped."""

    cfg: TrainConfig
    model: BarkGPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data_gen: torch.Generator  # the data position (every rank draws from the same stream)
    dataset: Dict[str, Any]  # the data's description, recorded to check it on resume
    world_size: int
    step: int = 0  # optimizer steps completed
    losses: List[float] = dataclasses.field(default_factory=list)
    val_history: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = -1
    rng: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # RNG states as of `step`

    def capture_rng(self, device: torch.device) -> None:
        self.rng = _rng_tensors(self.data_gen, device)

    def end_step(self, loss: float, device: torch.device) -> None:
        """The step's update is done: it counts, with its loss and the RNG/data position after it."""
        self.step += 1
        self.losses.append(loss)
        self.capture_rng(device)

    def record_eval(self, val_loss: float) -> None:
        self.val_history.append({"step": self.step, "val_loss": val_loss})
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step = val_loss, self.step

    def checkpoint_state(self) -> Dict[str, Any]:
        """The checkpoint's state.json (less the step and optimizer layout the saver adds)."""
        state = {"train_config": dataclasses.asdict(self.cfg), "losses": self.losses,
                 "val_history": self.val_history, "best_val_loss": self.best_val_loss,
                 "best_step": self.best_step, "dataset": self.dataset, "world_size": self.world_size}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def restore(self, resumed: Dict[str, Any], device: torch.device) -> None:
        """Everything but the weights (loaded before the model moves to its device) from a
        checkpoint read by checkpoint.load_training_checkpoint."""
        self.optimizer.load_state_dict(resumed["optimizer"])
        st = resumed["state"]
        self.step = st["step"]
        self.losses, self.val_history = list(st["losses"]), list(st["val_history"])
        self.best_val_loss, self.best_step = st["best_val_loss"], st["best_step"]
        if "scaler" in st:
            self.scaler.load_state_dict(st["scaler"])
        _restore_rng(resumed["extra"], self.data_gen, device)


@dataclass
class Run:
    """What a run uses besides its :class:`TrainState` (none of it is saved): where it runs,
    its data, the model as the forward sees it (DDP, torch.compile), its files and counters."""

    cfg: TrainConfig
    world: distributed.World
    device: torch.device
    amp_dtype: torch.dtype
    dataset: Any
    fwd: torch.nn.Module  # the model wrapped for the forward (DDP and/or torch.compile)
    ddp_model: torch.nn.Module  # the DDP wrapper (or the model): gradient sync is decided on it
    out_dir: str
    say: Callable[[str], None]
    on_step: Optional[Callable[[int, float], None]] = None
    metrics: Optional[_Metrics] = None
    bar: Any = None
    tokens_per_step: int = 0
    flops_per_token: float = 0.0
    peak: Optional[float] = None
    optimal: Optional[float] = None  # the corpus's best achievable loss (bark)
    resumed_from: Optional[int] = None  # the step resumed from (None: a new run)
    last_ckpt: Optional[str] = None
    t0: float = 0.0
    tok_done: int = 0  # tokens of the updates done by this process's run (all ranks)
    tokens_per_sec: float = 0.0  # as of the last step
    skipped: int = 0

    def amp(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def due(self, step: int, every: int) -> bool:
        """Whether what is done every ``every`` steps (0: never) is due at ``step``; the last
        step of the run is always one."""
        return bool(every) and (step % every == 0 or step == self.cfg.steps)


def setup(cfg: TrainConfig, world: distributed.World, resumed: Optional[Dict[str, Any]], say,
          on_step=None) -> tuple:
    """Build the model, optimizer, data and run directory: (Run, TrainState) ready to loop."""
    try:
        device = world.device(resolve_device(cfg.device))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    amp_dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)

    init = _init_model(cfg) if cfg.init_from is not None and not resumed else None
    model_cfg = resumed["config"] if resumed else init.config if init is not None else cfg.model_config()
    dataset = load_dataset(cfg.data, model_cfg.block_size)
    if init is not None:
        _check_init_data(init, dataset, cfg)
    if dataset.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"the data has a vocabulary of {dataset.vocab_size} tokens but the model's "
                            f"vocab_size is {model_cfg.vocab_size}; pass --vocab-size {dataset.vocab_size} "
                            f"(vocab_size={dataset.vocab_size}) or pick a preset or config with a vocabulary "
                            f"that large")
    model = BarkGPT(model_cfg, backend=cfg.backend) if init is None else init.set_backend(cfg.backend)
    model.tokenizer = dataset.tokenizer
    if resumed:
        model.load_weights(resumed["model"])
    model.to(device)
    backend_name = model.resolved_backend()  # raises here, clearly, if an explicit backend cannot run
    state = TrainState(
        cfg=cfg, model=model,
        optimizer=model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                             device_type=device.type),
        scaler=torch.amp.GradScaler(device.type, enabled=(amp_dtype == torch.float16)),
        data_gen=torch.Generator().manual_seed(cfg.seed + 1), dataset=dataset.describe(), world_size=world.size)
    if resumed:
        state.restore(resumed, device)
        say(f"resuming {os.path.abspath(cfg.out)} from step {state.step}")

    ddp_model = world.wrap(model, device)  # `model` itself when there is one process
    run = Run(cfg=cfg, world=world, device=device, amp_dtype=amp_dtype, dataset=dataset,
              fwd=torch.compile(ddp_model) if cfg.compile else ddp_model, ddp_model=ddp_model,
              out_dir="", say=say, on_step=on_step, resumed_from=state.step if resumed else None)
    if isinstance(dataset, BarkCorpus):
        run.optimal = dataset.optimal_loss(getattr(dataset, "val", None))
    run.tokens_per_step = cfg.batch_size * cfg.grad_accum * world.size * model_cfg.block_size  # all ranks
    # MFU per device: tokens/s of all ranks over world.size, against this device's peak (None
    # where the peak is unknown, e.g. CPUs, unless BARKGPT_PEAK_TFLOPS says).
    run.flops_per_token = model.flops_per_token()
    run.peak = perf.peak_flops(dtype=amp_dtype, device=device)

    # The run starts: now its directory is made (a default one reserved, so none is left empty
    # by a run that failed to start, and two runs started together never share one).
    if cfg.out is None:
        cfg.out = world.run_on_main(lambda: _reserve_out_dir(
            os.path.join("runs", os.path.basename(os.path.normpath(cfg.init_from)) if cfg.init_from
                         else cfg.preset if cfg.model is None else "custom")))
    else:
        world.run_on_main(lambda: _make_run_dir(cfg.out))
    run.out_dir = os.path.abspath(cfg.out)
    say(f"barkgpt: {model.num_params():,} parameters, {cfg.steps} steps of {run.tokens_per_step:,} tokens, "
        f"device {device}, backend {backend_name}, {str(amp_dtype).replace('torch.', '')}, out {run.out_dir}"
        + (f", {world.size} processes" if world.enabled else ""))
    run.metrics = _Metrics(os.path.join(run.out_dir, "metrics.jsonl") if world.is_main else None,
                           run.resumed_from)
    if world.is_main:
        with open(os.path.join(run.out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    if cfg.progress and world.is_main:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=cfg.steps, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       mininterval=0.5)
    if resumed:
        run.last_ckpt = world.run_on_main(lambda: ckpt.latest_checkpoint(run.out_dir))
    state.capture_rng(device)
    return run, state


def run_loop(run: Run, state: TrainState) -> None:
    """Steps until ``cfg.steps``; after each, its log line, evaluation and checkpoint when due.
    Ctrl-C asks to stop at the next step boundary all ranks agree on (a checkpoint is saved
    there); a second one stops at once. Any way out restores the process's signal handlers
    and determinism setting."""
    cfg, world = run.cfg, run.world
    interrupts = Interrupts(saved_step=state.step if run.resumed_from is not None else -1)
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:  # deterministic kernels (ours always are) and cuBLAS settings; restored after
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    run.t0 = time.perf_counter()
    try:
        while state.step < cfg.steps:
            result = train_step(run, state, interrupts)
            log_step(run, state, result)
            # a skipped step still ends its step: the evaluation and checkpoint due there happen
            if run.due(state.step, cfg.eval_every):
                evaluate_run(run, state)
            show_progress(run, state, result)
            if run.due(state.step, cfg.save_every) or state.step == cfg.steps:
                save_on_all_ranks(run, state, interrupts)
            interrupts.end_step()
            if run.on_step is not None:
                run.on_step(state.step, result.loss)
            # One process stops on its own Ctrl-C at once; ranks stop where they all learned of
            # it (the all-reduce in the step). The last step just finishes the run.
            if (result.stop or (interrupts.requested and not world.enabled)) and state.step < cfg.steps:
                if interrupts.saved_step != state.step:
                    save_on_all_ranks(run, state, interrupts)
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if run.bar is not None:
            run.bar.close()
            run.bar = None
        on_interrupt(run, state, interrupts)
        raise
    finally:
        interrupts.restore()
        if run.bar is not None:
            run.bar.close()
        run.metrics.close()
        torch.use_deterministic_algorithms(prev_deterministic)


def _finish(run: Run, state: TrainState) -> TrainResult:
    """Save the final model, report, and sample a little text."""
    cfg, say = run.cfg, run.say
    if run.resumed_from is not None and run.resumed_from >= cfg.steps:
        say(f"{run.out_dir} already trained for {run.resumed_from} steps (>= --steps {cfg.steps}); nothing to do")
    run.world.run_on_main(lambda: ckpt.save_model(state.model, run.out_dir, step=len(state.losses)))
    elapsed = time.perf_counter() - run.t0
    tps = run.tok_done / elapsed if elapsed > 0 and run.tok_done else 0.0
    final_val = state.val_history[-1]["val_loss"] if state.val_history else None
    msg = f"done: {len(state.losses)} steps"
    if final_val is not None:
        msg += f", val loss {final_val:.4f}"
    if run.optimal is not None:
        msg += f" (corpus optimum {run.optimal:.4f}, {100 * (final_val / run.optimal - 1):+.1f}%)"
    if run.skipped:
        msg += f", {run.skipped} non-finite steps skipped"
    say(msg + f"; model saved to {run.out_dir}")
    sample = None
    if cfg.sample and run.world.is_main:
        sample = _sample_text(state.model, run.dataset, run.device)
        if sample is not None:
            say(f"sample: {sample}")
    return TrainResult(model=state.model, out_dir=run.out_dir, checkpoint=run.last_ckpt, losses=state.losses,
                       val_history=state.val_history, final_val_loss=final_val,
                       best_val_loss=state.best_val_loss if state.best_step >= 0 else None,
                       optimal_loss=run.optimal, tokens_per_sec=tps, sample=sample)


# ---- the pieces of a step ---------------------------------------------------------------------

@dataclass
class StepResult:
    step: int  # the step just completed (1-based)
    loss: float  # mean over every real target of all micro-batches on all ranks
    grad_norm: float
    lr: float
    skipped: bool = False  # non-finite loss or gradient, dropped (on_nonfinite="skip")
    what: str = ""  # what was non-finite: "loss" or "gradient norm"
    stop: bool = False  # some rank asked to stop (Ctrl-C) before this step ended


def train_step(run: Run, state: TrainState, interrupts: Optional[Interrupts] = None) -> StepResult:
    """One optimizer step: the step's micro-batches, each forward/backward weighted by its share
    of the step's real targets, clipping, then the update (or, on a non-finite loss or
    gradient, a stop or a skip as ``on_nonfinite`` says). Advances ``state`` by one step."""
    cfg, world, device = run.cfg, run.world, run.device
    interrupts = interrupts if interrupts is not None else Interrupts(install=False)
    lr = lr_at(state.step, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    stats = accumulate_gradients(run, state)
    # One small all-reduce: the summed loss and any rank's stop request (so that all ranks stop
    # after this same step); the gradients (so the norm) are the same on every rank already.
    summed = world.sum_(torch.stack([stats["loss_sum"].float(),
                                     torch.tensor(float(interrupts.requested), device=device)]))
    loss, stop_votes, gnorm = torch.stack([summed[0] / stats["n_total"], summed[1],
                                           stats["grad_norm"].float()]).tolist()
    done = state.step + 1
    result = StepResult(step=done, loss=loss, grad_norm=gnorm, lr=lr, stop=stop_votes > 0)
    # With fp16 the scaler finds inf gradients itself (and skips those steps).
    if not (math.isfinite(loss) and math.isfinite(gnorm)) and not state.scaler.is_enabled():
        state.optimizer.zero_grad(set_to_none=True)
        result.what = "loss" if not math.isfinite(loss) else "gradient norm"
        if cfg.on_nonfinite == "stop":
            raise TrainingError(
                f"non-finite {result.what} at step {done} ({loss if result.what == 'loss' else gnorm}); "
                f"stopping. The last good checkpoint is {run.last_ckpt or 'none (none saved yet)'}; "
                f"lower --lr, use float32, or pass --skip-nonfinite (on_nonfinite='skip') to drop "
                f"such steps")
        result.skipped = True
        run.skipped += 1
    interrupts.begin_update(done)  # from here until the step's bookkeeping ends, nothing is saved
    if not result.skipped:
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        run.tok_done += run.tokens_per_step
    state.end_step(float("nan") if result.skipped else loss, device)
    return result


def accumulate_gradients(run: Run, state: TrainState) -> Dict[str, torch.Tensor]:
    """Forward/backward over the step's micro-batches, then unscale and clip. The step's loss
    is the mean over every non-ignored target of all micro-batches on all ranks: each
    micro-batch's mean is weighted by its share of those targets (pad targets differ from
    batch to batch), times world.size as DDP averages the ranks' gradients. Returns device
    tensors (read nothing back): {"loss_sum", "n_total" (a float), "grad_norm"}."""
    cfg, world, device, dataset = run.cfg, run.world, run.device, run.dataset
    world.seed_dropout(state.data_gen)
    batches = [world.local_batch(dataset, cfg.batch_size, state.data_gen) for _ in range(cfg.grad_accum)]
    counts = [int((y != dataset.ignore_index).sum()) for _, y in batches]  # CPU tensors: no device sync
    n_total = max(world.sum_(torch.tensor(float(sum(counts)), dtype=torch.float64,
                                          device=device if world.enabled else "cpu")).item(), 1.0)
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        weight = counts[micro] * world.size / n_total
        # Under DDP, gradients are averaged across ranks on the last micro-step only.
        with world.grad_sync(run.ddp_model, micro == cfg.grad_accum - 1):
            with run.amp():
                _, loss = run.fwd(x, y, dataset.ignore_index)
            state.scaler.scale(loss * weight).backward()
        loss_sum += loss.detach().float() * counts[micro]
    state.scaler.unscale_(state.optimizer)
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    if cfg.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return {"loss_sum": loss_sum, "n_total": n_total, "grad_norm": gnorm}


def log_step(run: Run, state: TrainState, result: StepResult) -> None:
    """The step's metrics line when due (a skipped step's event always)."""
    elapsed = time.perf_counter() - run.t0
    tps = run.tok_done / elapsed if elapsed > 0 else 0.0
    if result.skipped:
        run.metrics.write(step=result.step, event="skipped_nonfinite", what=result.what)
    elif run.due(result.step, run.cfg.log_every):
        util = perf.mfu(run.flops_per_token, tps / run.world.size, run.peak)
        run.metrics.write(step=result.step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                          tokens_per_sec=tps, elapsed_sec=elapsed, **({"mfu": util} if util is not None else {}))
    run.tokens_per_sec = tps


def show_progress(run: Run, state: TrainState, result: StepResult) -> None:
    if run.bar is not None:
        run.bar.update(1)
        post = {"loss": f"{result.loss:.4f}", "tok/s": f"{run.tokens_per_sec:,.0f}"}
        if state.val_history:
            post["val"] = f"{state.val_history[-1]['val_loss']:.4f}"
        run.bar.set_postfix(post, refresh=False)


def evaluate_run(run: Run, state: TrainState) -> float:
    """Evaluate the model at the step just completed; record it in the state and the metrics."""
    val_loss = evaluate(state.model, run.dataset, run.cfg.batch_size, run.device, run.amp, run.world)
    state.record_eval(val_loss)
    run.metrics.write(step=state.step, val_loss=val_loss, **({"optimal_loss": run.optimal} if run.optimal else {}))
    return val_loss


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device: torch.device, amp_ctx,
             world: Optional[distributed.World] = None) -> float:
    """Mean loss over every non-ignored target of the held-out set (split across ranks)."""
    world = world or distributed.World()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in world.shard(dataset.eval_batches(batch_size)):
            x, y = x.to(device), y.to(device)
            with amp_ctx():
                logits = model(x)
            n = int((y != dataset.ignore_index).sum())
            if n == 0:
                continue
            loss = BarkGPT.loss_from_logits(logits, y, dataset.ignore_index)
            total += loss.double() * n
            count += n
    finally:
        model.train(was_training)
    if world.enabled:
        sums = world.sum_(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)]))
        total, count = sums[0], int(sums[1])
    return float(total) / max(count, 1)


def save_checkpoint(state: TrainState, out_dir: str) -> str:
    """Write ``state`` as checkpoints/step_<step>/ (atomically), keeping the last ``keep_last``
    and the best by validation loss. Rank 0's state: weights and optimizer are the same on
    every rank, and the data stream is shared."""
    return ckpt.save_training_checkpoint(out_dir, state.step, state.model, state.optimizer,
                                         state.checkpoint_state(), state.rng, state.cfg.keep_last,
                                         keep_steps=(state.best_step,) if state.best_step >= 0 else ())


def save_on_all_ranks(run: Run, state: TrainState, interrupts: Interrupts) -> None:
    """Rank 0 saves; every rank waits for the save (and learns if it failed)."""
    run.last_ckpt = run.world.run_on_main(lambda: save_checkpoint(state, run.out_dir))
    interrupts.saved_step = state.step


def on_interrupt(run: Run, state: TrainState, interrupts: Interrupts) -> None:
    """A KeyboardInterrupt reached the loop: save the last whole step so that --resume loses
    nothing, unless it came in the middle of a step's update and bookkeeping (its state is
    then half-written), and say how to continue. No collectives: other ranks may be gone."""
    if not run.world.is_main:
        return
    whole = interrupts.updating is None or interrupts.saved_step == interrupts.updating  # saved just before
    if whole and state.step > interrupts.saved_step:
        run.last_ckpt = save_checkpoint(state, run.out_dir)
        interrupts.saved_step = state.step
    if whole:
        run.say(f"interrupted: saved {run.last_ckpt}; continue with --resume --out {run.out_dir}")
    else:
        run.say(f"interrupted in the middle of step {interrupts.updating}'s update: not saved; "
                f"--resume --out {run.out_dir} continues from {run.last_ckpt or 'the start'}")


class Interrupts:
    """Turns the first Ctrl-C (SIGINT) into a request that training honours at the next step
    boundary all ranks agree on; a second one raises KeyboardInterrupt at once. Installed only
    in the main thread over Python's default handler (never over someone else's), restored
    afterwards. Also tracks what an interrupt may save: ``updating`` is the step whose update
    and bookkeeping are under way (None between steps), ``saved_step`` the last step saved."""

    def __init__(self, saved_step: int = -1, install: bool = True):
        self.requested, self._old = False, None
        self.saved_step, self.updating = saved_step, None
        if install and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nbarkgpt: stopping at the next step boundary (saved there); Ctrl-C again to stop now",
              file=sys.stderr, flush=True)

    def begin_update(self, step: int) -> None:
        self.updating = step

    def end_step(self) -> None:
        self.updating = None

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None




# ---- opening a run: resume or a new directory --------------------------------------------------

def _open_run(cfg: TrainConfig, config: Optional[TrainConfig], overrides: Dict[str, Any], resume: bool,
              world_size: int, say) -> tuple:
    """Pick the run directory or load the checkpoint to resume: (cfg, resumed)."""
    resumed = None
    if resume:
        if cfg.out is None:
            raise TrainingError("resume needs the run directory: pass out=... (--out)")
        latest = ckpt.latest_checkpoint(cfg.out)
        if latest is None:
            raise TrainingError(f"nothing to resume in {cfg.out!r}: it has no checkpoints")
        resumed = ckpt.load_training_checkpoint(latest)
        saved = TrainConfig(**resumed["state"]["train_config"])
        # batch_size is per process: the global micro-batch (the data stream) stays the run's.
        saved_world = resumed["state"].get("world_size", 1)
        if saved_world != world_size:
            try:
                per_rank = distributed.resume_batch_size(saved.batch_size, saved_world, world_size)
            except ValueError as e:
                raise TrainingError(str(e)) from None
            say(f"resuming a {saved_world}-process run on {world_size}: batch_size {saved.batch_size} -> "
                f"{per_rank} per process keeps the global batch")
            saved.batch_size = per_rank
        # The run's identity comes from the checkpoint; only RESUME_MAY_CHANGE may differ.
        for k, v in overrides.items():
            if k == "data" and _data_path(v) == _data_path(saved.data):
                continue  # the same file, named another way (or relative, as older runs stored it)
            if k in RESUME_MAY_CHANGE or k == "out":
                setattr(saved, k, v)
            elif v != getattr(saved, k):
                raise TrainingError(f"{k}={v!r} differs from the run being resumed ({getattr(saved, k)!r}); "
                                    f"a resumed run keeps its settings (only {', '.join(RESUME_MAY_CHANGE)} "
                                    f"may change): drop the option or start a new run in another --out")
        if config is not None:
            for k in RESUME_MAY_CHANGE:
                setattr(saved, k, getattr(cfg, k))
        saved.out = cfg.out
        cfg = saved
    else:
        # (with no --out, a default run directory is reserved once the run starts: _train)
        if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise TrainingError(f"--out {cfg.out!r} is a file, not a directory; choose another --out")
        if cfg.out is not None and (ckpt.list_checkpoints(cfg.out)
                                    or os.path.exists(os.path.join(cfg.out, ckpt.MODEL_FILE))):
            raise TrainingError(f"{cfg.out!r} already holds a training run; pass --resume to continue it "
                                f"or choose another --out")
        # A path relative to where the run started would not resolve from elsewhere on --resume.
        # Not under torchrun: there each machine resolves a relative path in its own directory.
        if world_size == 1:
            cfg.data = _data_path(cfg.data)
    return cfg, resumed


def _init_model(cfg: TrainConfig) -> BarkGPT:
    """The model to fine-tune, from the Hugging Face GPT-2 directory ``cfg.init_from``."""
    from .hf import load_hf

    return load_hf(cfg.init_from)


def _check_init_data(init: BarkGPT, dataset, cfg: TrainConfig) -> None:
    """Fine-tuning data must be tokenized with the model's own tokenizer."""
    from .hf import same_tokenizer

    if init.tokenizer is not None and not same_tokenizer(init.tokenizer, dataset.tokenizer):
        raise TrainingError(f"--data {cfg.data!r} is not tokenized with the tokenizer of {cfg.init_from!r}; "
                            f"make a token file with it: barkgpt tokenize TEXT_FILE --tokenizer {cfg.init_from}, "
                            f"then --data TEXT_FILE.bin")
    if dataset.vocab_size > init.config.vocab_size:
        raise TrainingError(f"the data has a vocabulary of {dataset.vocab_size} tokens but {cfg.init_from!r} "
                            f"has {init.config.vocab_size}")


def _data_path(data: str) -> str:
    return data if data == "bark" else os.path.abspath(data)


def _make_run_dir(out: str) -> None:
    """Created only once the run is known to start (no empty run directories from bad settings)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create the run directory --out {out!r}: {e.strerror or e}") from None



# ---- helpers -----------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TrainingError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was requested but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dt = DTYPES[dtype]
    if dt == torch.float16 and device.type != "cuda":
        raise TrainingError("float16 autocast needs a CUDA GPU; use bfloat16 or float32 on CPU")
    return dt


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.steps - warmup - 1)  # the last step (steps - 1) gets exactly the minimum
    progress = min(1.0, (step - warmup) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def _reserve_out_dir(base: str) -> str:
    """The first of base, base-2, base-3 ... that this call creates (mkdir is atomic: two runs
    started together never share one)."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    i = 1
    while True:
        path = base if i == 1 else f"{base}-{i}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            i += 1

def _sample_text(model, dataset, device) -> Optional[str]:
    tok = getattr(dataset, "tokenizer", None)
    if tok is None:
        return None
    g = torch.Generator(device=device).manual_seed(0)
    if isinstance(dataset, BarkCorpus):
        prompt = " ".join(BarkCorpus.PROMPT)
        idx = torch.tensor([tok.encode(prompt)], device=device)
        out = model.generate(idx, max_new_tokens=dataset.MAX_BARKS + 2, eos_token_id=tok.eos_id, generator=g)
    else:
        idx = torch.tensor([tok.encode("\n")], device=device)
        out = model.generate(idx, max_new_tokens=min(200, model.config.block_size), generator=g)
    return tok.decode(out[0].tolist())


def _rng_tensors(data_gen: torch.Generator, device: torch.device) -> Dict[str, torch.Tensor]:
    t = {"rng.cpu": torch.get_rng_state(), "rng.data": data_gen.get_state()}
    if device.type == "cuda":
        t["rng.cuda"] = torch.cuda.get_rng_state(device)
    return t


def _restore_rng(extra: Dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(extra["rng.cpu"])
    data_gen.set_state(extra["rng.data"])
    if device.type == "cuda" and "rng.cuda" in extra:
        torch.cuda.set_rng_state(extra["rng.cuda"], device)


class _Metrics:
    """Append-only JSON-lines metrics file (one object per log/eval event); ``path=None``
    (ranks other than 0) writes nothing."""

    def __init__(self, path: Optional[str], resume_step: Optional[int]):
        self.path = path
        self.f = None
        if path is None:
            return
        if resume_step is None:  # a new run: whatever a run that crashed before its first save left
            self.f = open(path, "w", encoding="utf-8")
            return
        if os.path.exists(path):
            # Drop events after the checkpoint we resume from: they will be logged again.
            with open(path, encoding="utf-8") as f:
                keep = []
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line)
                    except ValueError:
                        pass  # a line cut by a crash
            ckpt.atomic_write_bytes(path, "".join(keep).encode())
        self.f = open(path, "a", encoding="utf-8")

    def write(self, **event) -> None:
        if self.f is not None:
            self.f.write(json.dumps(event) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


