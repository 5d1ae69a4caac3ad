"""Training: AdamW, warmup + cosine, gradient accumulation and clipping, autocast, periodic
validation, atomic checkpoints and exact resume.

``barkgpt.train(...)`` is the Python API; ``barkgpt train`` (cli.py) maps its flags onto
:class:`TrainConfig`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from . import checkpoint as ckpt
from . import perf
from . import plot
from . import distributed
from . import graphs
from .config import PRESETS, GPTConfig, default_eval_tokens, default_warmup, train_defaults
from .data import BarkCorpus, load_dataset
from .model import BarkGPT

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# Settings a resumed run may change; everything else must match the checkpoint.
RESUME_MAY_CHANGE = ("steps", "eval_every", "save_every", "keep_last", "log_every", "progress", "sample",
                     "device", "backend", "compile", "cuda_graph", "on_nonfinite", "eval_tokens", "eval_batches")


class TrainingError(RuntimeError):
    """Training cannot go on (bad settings, a non-finite loss ...); the message says why."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``timeout``, Slurm preemption, a container stop) ended training the way a Ctrl-C
    does: the run was saved at a step boundary when it could be (the message said where)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""

    preset: str = "bark"
    model: Optional[Dict[str, Any]] = None  # GPTConfig fields; overrides the preset when given
    vocab_size: Optional[int] = None  # overrides the model's vocab_size (a tokenized corpus's)
    # A Hugging Face GPT-2 directory to fine-tune: its config, weights and tokenizer (barkgpt.load_hf)
    init_from: Optional[str] = None
    data: str = "bark"
    val_data: Optional[str] = None  # a validation file like `data` (then all of `data` trains)
    val_fraction: Optional[float] = None  # held-out share of `data`; None: 0.1 (0 with val_data)
    steps: int = 600
    batch_size: Optional[int] = None  # None: the preset's (config.TRAIN_DEFAULTS)
    grad_accum: int = 1
    lr: Optional[float] = None  # None: the preset's
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # None: 5% of steps, at most the preset's cap
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
    eval_tokens: Optional[int] = None  # validation tokens per evaluation; None: the preset's / sized to the run
    eval_batches: Optional[int] = None  # or: this many batches of batch_size windows
    save_every: int = 200  # 0: only at the end
    keep_last: int = 3
    log_every: int = 10
    compile: bool = False
    # Capture the training step in a CUDA graph and replay it (one launch per step instead of
    # hundreds): an execution detail, the run's state is the same (barkgpt/graphs.py)
    cuda_graph: bool = False
    deterministic: bool = False
    on_nonfinite: str = "stop"  # or "skip": drop the step and go on
    progress: bool = True  # a progress bar on a terminal; plain log lines otherwise (or when False)
    sample: bool = True
    # Set when --resume changed `steps`: [step, lr] from which the rest of the cosine decay runs
    # (from that lr to the minimum at the new last step), so the learning rate never jumps.
    decay_from: Optional[List[float]] = None

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                raise TrainingError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")

        for n in ("steps", "grad_accum", "eval_every", "keep_last", "log_every"):
            positive(n)
        for n in ("batch_size", "eval_tokens", "eval_batches"):
            if getattr(self, n) is not None:
                positive(n)
        if self.eval_tokens is not None and self.eval_batches is not None:
            raise TrainingError("give eval_tokens or eval_batches (--eval-tokens or --eval-batches), not both")
        if self.val_fraction is not None and (isinstance(self.val_fraction, bool) or not isinstance(
                self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1):
            raise TrainingError(f"val_fraction must be a number in [0, 1), got {self.val_fraction!r}")
        if self.val_data is not None and self.val_fraction:
            raise TrainingError("give val_data or val_fraction (--val-data or --val-fraction), not both")
        if self.vocab_size is not None:
            positive("vocab_size")
        positive("save_every", allow_zero=True)
        if self.warmup_steps is not None:
            positive("warmup_steps", allow_zero=True)
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "beta1", "beta2"):
            v = getattr(self, name)
            if v is None and name == "lr":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TrainingError(f"{name} must be a finite number, got {v!r}")
        if self.lr is not None and not 0 < self.lr < 10:
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
        if not isinstance(self.cuda_graph, bool):
            raise TrainingError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        if self.compile and self.cuda_graph:
            raise TrainingError("compile and cuda_graph (--compile, --cuda-graph) cannot be combined: "
                                "pick one (cuda_graph replays our kernels as they are)")
        if self.on_nonfinite not in ("stop", "skip"):
            raise TrainingError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.init_from is not None:
            if not isinstance(self.init_from, str) or not self.init_from:
                raise TrainingError(f"init_from must be a directory path, got {self.init_from!r}")
            if self.model is not None or self.vocab_size is not None:
                raise TrainingError("init_from takes the model's config from that directory: drop --config and "
                                    "--vocab-size (model=, vocab_size=)")

    def model_config(self) -> GPTConfig:
        if self.init_from is not None:  # the fine-tuned directory's (its weights load in setup)
            from .hf import read_hf_config

            return read_hf_config(self.init_from)
        cfg = GPTConfig.from_dict(dict(self.model)) if self.model is not None else GPTConfig.preset(self.preset)
        if self.vocab_size is not None:
            cfg = dataclasses.replace(cfg, vocab_size=self.vocab_size)
        return cfg

    def defaults(self) -> Dict[str, Any]:
        """The preset's training defaults (config.train_defaults), by size for a model of your own
        (--config or --init-from)."""
        own = self.model is not None or self.init_from is not None
        return train_defaults(None if own else self.preset, self.model_config())

    def fill_defaults(self) -> None:
        """Fill lr, batch_size and warmup_steps left to the preset with its values (a new run
        saves them, so a later change of the defaults never changes a resumed run)."""
        if self.lr is None or self.batch_size is None or self.warmup_steps is None:
            d = self.defaults()
            if self.lr is None:
                self.lr = d["lr"]
            if self.batch_size is None:
                self.batch_size = d["batch_size"]
            if self.warmup_steps is None:
                self.warmup_steps = default_warmup(self.steps, d["warmup_max"])

    def eval_windows(self, block_size: int, tokens_per_step: int) -> int:
        """Windows (sequences of block_size tokens) per evaluation asked for."""
        if self.eval_batches is not None:
            return self.eval_batches * self.batch_size
        tokens = self.eval_tokens
        if tokens is None:
            tokens = default_eval_tokens(self.defaults(), self.eval_every, tokens_per_step, block_size)
        return max(1, -(-tokens // block_size))


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
    # text corpora: the last evaluation in bits per byte of the text (comparable across tokenizers)
    final_val_bpb: Optional[float] = None
    final_val_ppl: Optional[float] = None  # exp(final_val_loss): perplexity per token


# ---- the run, top-down: settings -> setup -> loop -> final save ------------------------------

def train(config: Union[TrainConfig, None] = None, *, resume: bool = False, allow_data_change: bool = False,
          log=None, on_step: Optional[Callable[[int, float], None]] = None, **overrides) -> TrainResult:
    """Train a BarkGPT. Pass a TrainConfig and/or its fields as keyword arguments, e.g.
    ``barkgpt.train(preset="bark", steps=300, out="runs/demo")``. With ``resume=True`` the run in
    ``out`` continues from its latest checkpoint, exactly as if it had never stopped; settings
    given (as keywords, or as the fields of ``config`` that differ from TrainConfig's defaults)
    must agree with the run's, except those in RESUME_MAY_CHANGE. A resume refuses data that
    changed since the checkpoint unless ``allow_data_change=True``. ``log(msg)`` receives
    progress messages (default: stderr); ``on_step(step, loss)`` is called after every
    optimizer step (an exception from it ends the run, as a crash would). SIGTERM is handled
    like Ctrl-C, ending in :class:`Terminated` (a KeyboardInterrupt).

    Launched by torchrun with several processes, this trains data-parallel (see
    barkgpt/distributed.py): ``batch_size`` is per process, rank 0 logs and writes the files,
    and every rank returns the same result."""
    return _train(distributed.init(), config, resume, log, on_step, overrides, allow_data_change)


def _train(world: distributed.World, config, resume, log, on_step, overrides,
           allow_data_change: bool = False) -> TrainResult:
    cfg = _settings(config, overrides)
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not world.is_main:
        say = lambda msg: None  # noqa: E731  (rank 0 speaks for the run)
    lock = RunLock()  # rank 0 holds the run directory's lock for the whole run
    try:
        # rank 0 decides (and reads the checkpoint to resume), every rank follows
        cfg, resumed = world.run_on_main(lambda: _open_run(cfg, config, overrides, resume, world.size, say, lock))
        run, state = setup(cfg, world, resumed, say, on_step, lock, allow_data_change)
        run_loop(run, state)
        return _finish(run, state)
    finally:
        lock.release()


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

    def end_step(self, device: torch.device) -> None:
        """The step's update is done: it counts, with the RNG/data position after it (its loss
        joins ``losses`` when it is read back: account_steps)."""
        self.step += 1
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
    peak_source: Optional[str] = None  # "measured" (a CPU), "datasheet", "env" (perf.peak_source)
    optimal: Optional[float] = None  # the corpus's best achievable loss (bark)
    eval_windows: int = 0  # windows (block_size tokens each) per evaluation
    token_bytes: Optional[torch.Tensor] = None  # bytes of text per token id (text corpora), for bits per byte
    plain: bool = True  # plain log lines instead of a progress bar
    recent: Any = None  # (time, tokens done) of the last steps: the recent tokens/s
    first_step_s: Optional[float] = None  # how long the first step of this process took (compilation)
    resumed_from: Optional[int] = None  # the step resumed from (None: a new run)
    last_ckpt: Optional[str] = None
    t0: float = 0.0
    tok_done: int = 0  # tokens of the updates done by this process's run (all ranks)
    tokens_per_sec: float = 0.0  # as of the last step
    skipped: int = 0
    pending: List[StepResult] = dataclasses.field(default_factory=list)  # steps whose numbers are unread
    graph: Optional[GraphStep] = None  # cuda_graph: the captured training step

    def amp(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        if self.graph is not None:  # autocast's weight cache cannot live inside a captured graph
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, cache_enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def due(self, step: int, every: int) -> bool:
        """Whether what is done every ``every`` steps (0: never) is due at ``step``; the last
        step of the run is always one."""
        return bool(every) and (step % every == 0 or step == self.cfg.steps)


def setup(cfg: TrainConfig, world: distributed.World, resumed: Optional[Dict[str, Any]], say,
          on_step=None, lock: Optional[RunLock] = None, allow_data_change: bool = False) -> tuple:
    """Build the model, optimizer, data and run directory: (Run, TrainState) ready to loop.
    ``lock`` (rank 0's; None: none) is taken on the run directory as it is made."""
    try:
        device = world.device(resolve_device(cfg.device))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    amp_dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    cfg.fill_defaults()  # lr, batch size, warmup: the preset's unless given

    init = _init_model(cfg) if cfg.init_from is not None and not resumed else None
    model_cfg = resumed["config"] if resumed else init.config if init is not None else cfg.model_config()
    dataset = load_dataset(cfg.data, model_cfg.block_size, val_data=cfg.val_data, val_fraction=cfg.val_fraction)
    if init is not None:
        _check_init_data(init, dataset, cfg)
    if dataset.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"the data has a vocabulary of {dataset.vocab_size} tokens but the model's "
                            f"vocab_size is {model_cfg.vocab_size}; pass --vocab-size {dataset.vocab_size} "
                            f"(vocab_size={dataset.vocab_size}) or pick a preset or config with a vocabulary "
                            f"that large")
    data_info = world.run_on_main(lambda: describe_data(dataset))
    if resumed:
        world.run_on_main(lambda: check_same_data(resumed["state"].get("dataset"), data_info, allow_data_change, say))
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
        data_gen=torch.Generator().manual_seed(cfg.seed + 1), dataset=data_info, world_size=world.size)
    if resumed:
        state.restore(resumed, device)
        say(f"resuming {os.path.abspath(cfg.out)} from step {state.step}")

    api = None
    if cfg.cuda_graph:  # refused here, before the run directory is made
        api = graph_api(device)
        problem = cuda_graph_problem(api, world, amp_dtype, state.optimizer)
        if problem:
            raise TrainingError(f"cuda_graph (--cuda-graph) cannot run here: {problem}")
    ddp_model = world.wrap(model, device)  # `model` itself when there is one process
    run = Run(cfg=cfg, world=world, device=device, amp_dtype=amp_dtype, dataset=dataset,
              fwd=torch.compile(ddp_model) if cfg.compile else ddp_model, ddp_model=ddp_model,
              out_dir="", say=say, on_step=on_step, resumed_from=state.step if resumed else None)
    if isinstance(dataset, BarkCorpus):
        run.optimal = dataset.optimal_loss(getattr(dataset, "val", None))
    run.tokens_per_step = cfg.batch_size * cfg.grad_accum * world.size * model_cfg.block_size  # all ranks
    run.eval_windows = dataset.eval_windows(cfg.eval_windows(model_cfg.block_size, run.tokens_per_step))
    run.token_bytes = getattr(dataset, "token_bytes", None)
    # MFU per device: tokens/s of all ranks over world.size, against this device's peak (None
    # where the peak is unknown, e.g. CPUs, unless BARKGPT_PEAK_TFLOPS says).
    run.flops_per_token = model.flops_per_token()
    run.peak = perf.peak_flops(dtype=amp_dtype, device=device)
    run.peak_source = perf.peak_source(device) if run.peak is not None else None

    # The run starts: now its directory is made (a default one reserved, so none is left empty
    # by a run that failed to start, and two runs started together never share one).
    if cfg.out is None:
        cfg.out = world.run_on_main(lambda: _reserve_out_dir(
            os.path.join("runs", os.path.basename(os.path.normpath(cfg.init_from)) if cfg.init_from
                         else cfg.preset if cfg.model is None else "custom"), lock))
    else:
        world.run_on_main(lambda: _make_run_dir(cfg.out, lock))
    run.out_dir = os.path.abspath(cfg.out)
    say(f"barkgpt: {model.num_params():,} parameters, {cfg.steps} steps of {run.tokens_per_step:,} tokens, "
        f"device {device}, backend {backend_name}, {str(amp_dtype).replace('torch.', '')}, out {run.out_dir}"
        + (f", {world.size} processes" if world.enabled else ""))
    say(f"lr {cfg.lr:g} (warmup {cfg.warmup_steps} steps), batch {cfg.batch_size} x {model_cfg.block_size} tokens"
        + (f" x {cfg.grad_accum} micro-steps" if cfg.grad_accum > 1 else "")
        + f"; evaluation every {cfg.eval_every} steps: {run.eval_windows:,} windows = "
          f"{run.eval_windows * model_cfg.block_size:,} tokens of {_val_source(dataset)}; loss: cross-entropy in "
          f"nats per token" + ("; bits per byte of text for evaluations" if run.token_bytes is not None else ""))
    run.metrics = _Metrics(os.path.join(run.out_dir, "metrics.jsonl") if world.is_main else None,
                           run.resumed_from, say)
    if world.is_main:
        write_run_file(os.path.join(run.out_dir, "train_config.json"),
                       json.dumps(dataclasses.asdict(cfg), indent=2).encode())
    # A bar on a terminal; plain lines every log_every steps in a file, a pipe or a scheduler's log.
    run.plain = not (cfg.progress and _is_terminal(sys.stderr))
    if world.is_main and not run.plain:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=cfg.steps, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       mininterval=0.5)
    if resumed:
        run.last_ckpt = world.run_on_main(lambda: ckpt.latest_checkpoint(run.out_dir))
    if cfg.cuda_graph:
        run.graph = GraphStep(run, state, api)
        say("cuda_graph: the training step is captured in a CUDA graph at the first step and replayed "
            "after it; evaluation runs outside the graph")
    state.capture_rng(device)
    return run, state


def run_loop(run: Run, state: TrainState) -> None:
    """Steps until ``cfg.steps``; after each, its log line, evaluation and checkpoint when due.
    Ctrl-C or SIGTERM asks to stop at the next step boundary all ranks agree on (a checkpoint
    is saved there); a second one stops at once. Any way out restores the process's signal
    handlers and determinism setting."""
    cfg, world = run.cfg, run.world
    interrupts = Interrupts(saved_step=state.step if run.resumed_from is not None else -1,
                            announce=world.is_main)  # (torchrun passes a SIGTERM to every rank)
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:  # deterministic kernels (ours always are) and cuBLAS settings; restored after
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    run.t0 = time.perf_counter()
    run.recent = collections.deque(maxlen=RECENT_STEPS + 1)
    run.recent.append((run.t0, 0))
    if cfg.compile and state.step < cfg.steps:
        run.say("compiling the model (torch.compile): the first step takes longer")
        if run.bar is not None:
            run.bar.set_postfix_str("compiling (first step)", refresh=True)
    try:
        while state.step < cfg.steps:
            result = train_step(run, state, interrupts)
            # the step's loss and grad norm stay on the device until a boundary needs them
            if any(run.due(state.step, every) for every in (cfg.log_every, cfg.eval_every, cfg.save_every)) \
                    or run.on_step is not None or result.stop or interrupts.requested:
                read_steps(run, state)
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
                raise Terminated() if interrupts.by_sigterm else KeyboardInterrupt()
    except KeyboardInterrupt as e:
        if run.bar is not None:
            run.bar.close()
            run.bar = None
        on_interrupt(run, state, interrupts, isinstance(e, Terminated))
        e.reported_by_train = True  # the command line adds nothing to what on_interrupt said
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
    if run.world.is_main:
        plot.write_loss_png(run.out_dir)  # the run's final loss.png (skipped quietly without matplotlib)
    elapsed = time.perf_counter() - run.t0
    tps = run.tok_done / elapsed if elapsed > 0 and run.tok_done else 0.0
    final_val = state.val_history[-1]["val_loss"] if state.val_history else None
    final_bpb = state.val_history[-1].get("val_bpb") if state.val_history else None
    final_ppl = state.val_history[-1].get("val_ppl") if state.val_history else None
    msg = f"done: {len(state.losses)} steps"
    if final_val is not None:
        msg += f", val loss {final_val:.4f}"
    if final_bpb is not None:
        msg += f" ({final_bpb:.4f} bits per byte, perplexity {final_ppl:.2f})"
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
                       optimal_loss=run.optimal, tokens_per_sec=tps, sample=sample, final_val_bpb=final_bpb,
                       final_val_ppl=final_ppl)


# ---- the pieces of a step ---------------------------------------------------------------------

@dataclass
class StepResult:
    """A step as train_step leaves it. Its loss and gradient norm stay on the device
    (``values``) until read_steps reads the steps pending since the last boundary, at once."""

    step: int  # the step just completed (1-based)
    lr: float
    values: torch.Tensor  # float32 [loss, grad norm] on the device
    stop: bool = False  # some rank asked to stop (Ctrl-C, SIGTERM) before this step ended
    read: bool = False  # whether the fields below are known yet
    loss: float = math.nan  # mean over every real target of all micro-batches on all ranks
    grad_norm: float = math.nan
    skipped: bool = False  # non-finite loss or gradient, dropped (on_nonfinite="skip")
    what: str = ""  # what was non-finite: "loss" or "gradient norm"


def train_step(run: Run, state: TrainState, interrupts: Optional[Interrupts] = None) -> StepResult:
    """One optimizer step: the step's micro-batches, each forward/backward weighted by its share
    of the step's real targets, clipping, then the update, which a non-finite loss or gradient
    norm cancels. Advances ``state`` by one step. Nothing is read back from the device (one
    stop vote per step under DDP aside): with a fused optimizer the update is cancelled on the
    device (its ``found_inf``) and read_steps applies ``on_nonfinite`` (stop or skip) at the
    next boundary; other optimizers read the numbers now, before the update."""
    cfg, world, device = run.cfg, run.world, run.device
    interrupts = interrupts if interrupts is not None else Interrupts(install=False)
    lr = lr_at(state.step, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if run.graph is not None:
        return run.graph.step(lr, interrupts)
    stats = accumulate_gradients(run, state)
    loss_sum, stop = stats["loss_sum"].float(), interrupts.requested
    if world.enabled:
        # One small all-reduce: the summed loss and any rank's stop request (so that all ranks
        # stop after this same step); the gradients (so the norm) are the same on every rank.
        summed = world.sum_(torch.stack([loss_sum, torch.tensor(float(stop), device=device)]))
        loss_sum, stop = summed[0], summed[1].item() > 0
    done = state.step + 1
    result = StepResult(step=done, lr=lr, values=torch.stack([loss_sum / stats["n_total"],
                                                              stats["grad_norm"].float()]), stop=stop)
    check = not state.scaler.is_enabled()  # with fp16 the scaler finds inf gradients itself (and skips those steps)
    on_device = check and all(g.get("fused") for g in state.optimizer.param_groups)
    if check and not on_device:
        account_steps(run, state, [result])  # raises on a non-finite step if on_nonfinite="stop"
    interrupts.begin_update(done)  # from here until the step's bookkeeping ends, nothing is saved
    if not result.skipped:
        if on_device:  # the fused update does nothing where found_inf is 1 (its step count included)
            state.optimizer.found_inf = (~torch.isfinite(result.values).all()).float()
        try:
            state.scaler.step(state.optimizer)
        finally:
            state.optimizer.__dict__.pop("found_inf", None)
        state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if not result.read:
        run.pending.append(result)
    state.end_step(device)
    return result


def read_steps(run: Run, state: TrainState) -> None:
    """Read the pending steps' numbers back from the device (one read) and account for them."""
    pending, run.pending = run.pending, []
    if pending:
        account_steps(run, state, pending)


def account_steps(run: Run, state: TrainState, results: List[StepResult]) -> None:
    """Read ``results`` (one read for all) and account for them in order: their losses (nan for
    a skipped step), tokens and skip events; the first non-finite one stops the run if
    ``on_nonfinite`` is "stop" (nothing after the last good checkpoint is saved)."""
    values = torch.stack([r.values for r in results]).tolist()
    for r, (loss, gnorm) in zip(results, values):
        r.loss, r.grad_norm, r.read = loss, gnorm, True
        if not (math.isfinite(loss) and math.isfinite(gnorm)) and not state.scaler.is_enabled():
            r.what = "loss" if not math.isfinite(loss) else "gradient norm"
            if run.cfg.on_nonfinite == "stop":
                raise TrainingError(
                    f"non-finite {r.what} at step {r.step} ({loss if r.what == 'loss' else gnorm}); "
                    f"stopping. The last good checkpoint is {run.last_ckpt or 'none (none saved yet)'}; "
                    f"lower --lr, use float32, or pass --skip-nonfinite (on_nonfinite='skip') to drop "
                    f"such steps")
            r.skipped = True
            run.skipped += 1
            state.losses.append(float("nan"))
            run.metrics.write(step=r.step, event="skipped_nonfinite", what=r.what)
        else:
            state.losses.append(loss)
            run.tok_done += run.tokens_per_step


def accumulate_gradients(run: Run, state: TrainState) -> Dict[str, torch.Tensor]:
    """Forward/backward over the step's micro-batches, then unscale and clip. The step's loss
    is the mean over every non-ignored target of all micro-batches on all ranks: each
    micro-batch's mean is weighted by its share of those targets (pad targets differ from
    batch to batch), times world.size as DDP averages the ranks' gradients. Returns device
    tensors (read nothing back): {"loss_sum", "n_total" (a float), "grad_norm"}."""
    batches, counts, n_total = draw_batches(run, state)
    xs = [x.to(run.device, non_blocking=True) for x, _ in batches]
    ys = [y.to(run.device, non_blocking=True) for _, y in batches]
    weights = [c * run.world.size / n_total for c in counts]
    loss_sum, gnorm = forward_backward(run, state, xs, ys, weights, counts)
    return {"loss_sum": loss_sum, "n_total": n_total, "grad_norm": gnorm}


def draw_batches(run: Run, state: TrainState) -> tuple:
    """The step's micro-batches (host tensors) from the data stream, their real-target counts
    and the count over all micro-batches and ranks (at least 1): (batches, counts, n_total)."""
    cfg, world, dataset = run.cfg, run.world, run.dataset
    world.seed_dropout(state.data_gen)
    batches = [world.local_batch(dataset, cfg.batch_size, state.data_gen) for _ in range(cfg.grad_accum)]
    # counted on the host batches (numpy): no read from the device
    counts = [int(np.count_nonzero(y.numpy() != dataset.ignore_index)) for _, y in batches]
    n_total = float(sum(counts))
    if world.enabled:  # the real targets of all ranks (read: the micro-batch weights are Python numbers)
        n_total = world.sum_(torch.tensor(n_total, dtype=torch.float64, device=run.device)).item()
    return batches, counts, max(n_total, 1.0)


def forward_backward(run: Run, state: TrainState, xs, ys, weights, counts) -> tuple:
    """The device work of a step before the update: forward and backward of each micro-batch
    (inputs ``xs``, targets ``ys`` on the device; loss weight and real-target count per
    micro-batch, Python numbers or device scalars), then unscale and clip. Returns (loss_sum,
    grad_norm) on the device. The eager step and the CUDA-graph step (GraphStep) both run it."""
    cfg, world, dataset = run.cfg, run.world, run.dataset
    loss_sum = torch.zeros((), device=run.device)
    for micro, (x, y) in enumerate(zip(xs, ys)):
        # Under DDP, gradients are averaged across ranks on the last micro-step only.
        with world.grad_sync(run.ddp_model, micro == len(xs) - 1):
            with run.amp():
                _, loss = run.fwd(x, y, dataset.ignore_index)
            state.scaler.scale(loss * weights[micro]).backward()
        loss_sum += loss.detach().float() * counts[micro]
    state.scaler.unscale_(state.optimizer)
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    if cfg.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return loss_sum, gnorm


def graph_api(device: torch.device):
    """The CUDA-graph operations for ``device`` (tests substitute a stand-in)."""
    return graphs.CudaGraphs(device)


def cuda_graph_problem(api, world: distributed.World, amp_dtype: torch.dtype, optimizer) -> Optional[str]:
    """Why the training step cannot be captured in a CUDA graph here (None: it can)."""
    problem = api.unsupported()
    if problem:
        return problem + " (drop --cuda-graph)"
    if world.enabled:
        return ("not with several processes: DDP's gradient all-reduce and the per-step stop vote "
                "run outside a graph; drop --cuda-graph or train on one process")
    if amp_dtype == torch.float16:
        return ("float16's loss scaler reads the GPU every step; use --dtype bfloat16 (the default on "
                "GPUs that have it) or float32")
    if not all(g.get("fused") for g in optimizer.param_groups):
        return "it needs the fused AdamW (which cancels a non-finite step on the device)"
    return None


def _lr_tensor_dtype(device: torch.device) -> torch.dtype:
    """The most precise learning-rate tensor the fused AdamW accepts on ``device`` (a throwaway
    update on a dummy parameter tells)."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros(1, device=device)
    try:
        torch.optim.AdamW([p], lr=torch.tensor(1e-3, dtype=torch.float64, device=device), fused=True).step()
        return torch.float64
    except (RuntimeError, TypeError, ValueError):
        return torch.float32


class GraphStep:
    """The training step as a CUDA graph (``cuda_graph=True``): the same work as the eager
    train_step (forward_backward, the non-finite check, the fused update cancelled on the
    device by ``found_inf``), captured at the first step and replayed at every step.

    Before each replay the host copies in what changes from step to step: the micro-batches
    (static input/target buffers), their loss weights and target counts, and the learning rate
    (a device tensor the captured optimizer reads: the schedule goes on without re-capture).
    The replay writes [loss, grad norm] into a static tensor; each step keeps a copy, read at
    the log/eval/save boundaries like the eager loop's. The weights, optimizer state, step
    counts and RNG states are the run's own tensors, updated in place: checkpoints and resume
    are the eager run's. Every batch must have the first one's shape; token ids and targets
    are checked on the host batches (inside a graph the kernels cannot report a bad one)."""

    def __init__(self, run: Run, state: TrainState, api):
        self.run, self.state, self.api = run, state, api
        self.captured = graphs.CapturedStep(self._body, api)
        self.x = self.y = self.scalars = None
        device = run.device
        # float64 where the fused AdamW takes it: the eager step passes lr as a Python float
        # (double), and a float32 lr would round it (the updates would differ in the last bits).
        self.lr = torch.zeros((), dtype=_lr_tensor_dtype(device), device=device)
        self.values = torch.zeros(2, dtype=torch.float32, device=device)
        self.cuda = device.type == "cuda"

    def _body(self, skip_update: bool) -> None:
        """One step on the static buffers; ``skip_update`` (the warm-up) cancels the update."""
        run, state = self.run, self.state
        opt = state.optimizer
        A = self.x.shape[0]
        saved = [(g["lr"], g.get("capturable", False)) for g in opt.param_groups]
        # (capturable only while capturing: AdamW refuses a capture without it, and warns when
        # a capturable instance steps outside one, as the warm-up does)
        capturing = self.cuda and torch.cuda.is_current_stream_capturing()
        for g in opt.param_groups:  # the captured update reads the lr tensor (set before each replay)
            g["lr"] = self.lr
            g["capturable"] = g.get("capturable", False) or capturing
        try:
            opt.zero_grad(set_to_none=True)  # the backward writes fresh gradients (graph memory)
            loss_sum, gnorm = forward_backward(run, state, list(self.x), list(self.y), self.scalars[:A],
                                               self.scalars[A:2 * A])
            values = torch.stack([loss_sum / self.scalars[2 * A], gnorm.float()])
            if skip_update:
                opt.found_inf = torch.ones((), dtype=torch.float32, device=run.device)
            else:  # as the eager step: no update where the loss or the gradient norm is not finite
                opt.found_inf = (~torch.isfinite(values).all()).float()
            try:
                state.scaler.step(opt)
            finally:
                opt.__dict__.pop("found_inf", None)
            self.values.copy_(values)
        finally:
            for g, (lr, capturable) in zip(opt.param_groups, saved):  # the state_dict stays the eager one's
                g["lr"], g["capturable"] = lr, capturable

    def _load(self, batches, counts, n_total: float, lr: float) -> None:
        """Copy the step's inputs into the static buffers (no read from the device)."""
        run = self.run
        xs = torch.stack([x for x, _ in batches])
        ys = torch.stack([y for _, y in batches])
        # Checked here, on the host copies: inside a graph the kernels can only mask bad ids.
        vocab, ignore = self.state.model.config.vocab_size, run.dataset.ignore_index
        bad_x = xs[(xs < 0) | (xs >= vocab)]
        if bad_x.numel():
            raise IndexError(f"token id {int(bad_x[0])} is out of range for a vocabulary of {vocab}")
        bad_y = ys[((ys < 0) | (ys >= vocab)) & (ys != ignore)]
        if bad_y.numel():
            raise IndexError(f"target {int(bad_y[0])} is out of range for {vocab} classes "
                             f"(or ignore_index={ignore})")
        host = torch.tensor([c * run.world.size / n_total for c in counts] + [float(c) for c in counts]
                            + [n_total], dtype=torch.float32)
        if self.x is None:
            self.x = torch.empty_like(xs, device=run.device)
            self.y = torch.empty_like(ys, device=run.device)
            self.scalars = torch.empty_like(host, device=run.device)
        elif xs.shape != self.x.shape or ys.shape != self.y.shape:
            raise TrainingError(f"cuda_graph replays one shape of batch: this step's batches are {tuple(xs.shape)}, "
                                f"the captured ones {tuple(self.x.shape)}; drop --cuda-graph for this data")
        if self.cuda:  # pinned: the copies do not wait for the host
            xs, ys, host = xs.pin_memory(), ys.pin_memory(), host.pin_memory()
        self.x.copy_(xs, non_blocking=True)
        self.y.copy_(ys, non_blocking=True)
        self.scalars.copy_(host, non_blocking=True)
        self.lr.fill_(lr)

    def step(self, lr: float, interrupts: Interrupts) -> StepResult:
        """train_step for a captured step: load, replay, account (as the eager fused path)."""
        run, state = self.run, self.state
        batches, counts, n_total = draw_batches(run, state)
        self._load(batches, counts, n_total, lr)
        if not self.captured.captured:
            t0 = time.perf_counter()
            run.say(f"cuda_graph: capturing the training step ({run.cfg.grad_accum} micro-step"
                    f"{'s' if run.cfg.grad_accum > 1 else ''}) after {graphs.WARMUP_STEPS} warm-up runs")
            interrupts.begin_update(state.step + 1)  # the warm-up touches the gradients: nothing is saved
            self.captured()
            run.say(f"cuda_graph: warmed up and captured in {time.perf_counter() - t0:.1f}s")
        else:
            interrupts.begin_update(state.step + 1)
            self.captured()
        result = StepResult(step=state.step + 1, lr=lr, values=self.values.clone(), stop=interrupts.requested)
        run.pending.append(result)
        state.end_step(run.device)
        return result


RECENT_STEPS = 20  # the recent tokens/s is over this many steps (compilation drops out of it)
EVAL_PROGRESS_EVERY_S = 5.0  # plain logs: a line this often while a long evaluation runs


def log_step(run: Run, state: TrainState, result: StepResult) -> None:
    """The step's metrics line when due (read_steps has read it then; it wrote skip events)."""
    now = time.perf_counter()
    elapsed = now - run.t0
    tps = run.tok_done / elapsed if elapsed > 0 else 0.0
    if run.first_step_s is None:
        run.first_step_s = elapsed
        if run.cfg.compile or run.cfg.cuda_graph:  # the first step compiled or captured: rates from the second on
            run.recent.clear()
            if run.bar is not None and run.cfg.compile:
                run.bar.set_postfix_str(f"compiled in {elapsed:.1f}s", refresh=False)
    # tokens of the steps taken (read or not: the rate needs no read of the device)
    run.recent.append((now, (result.step - (run.resumed_from or 0)) * run.tokens_per_step))
    if result.read and not result.skipped and run.due(result.step, run.cfg.log_every):
        util = perf.mfu(run.flops_per_token, tps / run.world.size, run.peak)
        run.metrics.write(step=result.step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                          tokens_per_sec=tps, elapsed_sec=elapsed,
                          **({"mfu": util, "mfu_peak": run.peak_source} if util is not None else {}))
    run.tokens_per_sec = tps


def recent_rate(run: Run) -> Optional[tuple]:
    """(tokens/s, seconds per step) over the last RECENT_STEPS steps; None before there are two points."""
    if run.recent is None or len(run.recent) < 2:
        return None
    (t_a, tok_a), (t_b, tok_b) = run.recent[0], run.recent[-1]
    if t_b <= t_a:
        return None
    return (tok_b - tok_a) / (t_b - t_a), (t_b - t_a) / (len(run.recent) - 1)


def show_progress(run: Run, state: TrainState, result: StepResult) -> None:
    """The bar on a terminal; otherwise a plain line every log_every steps (and at the last)."""
    rate = recent_rate(run)
    if run.bar is not None:
        if result.step == 1 + (run.resumed_from or 0) and run.cfg.compile:
            # ETA from the steps after the compiling one
            run.bar.update(1)
            run.bar.start_t, run.bar.initial = run.bar._time(), run.bar.n  # noqa: SLF001
            return
        run.bar.update(1)
        if result.read:  # the numbers are shown as they are read (at each log line)
            post = {"loss": f"{result.loss:.4f}", "tok/s": f"{rate[0]:,.0f}" if rate else "-"}
            if state.val_history:
                post["val"] = f"{state.val_history[-1]['val_loss']:.4f}"
            run.bar.set_postfix(post, refresh=False)
        return
    # plain lines: at the log boundaries (where the step's numbers are read), and after the
    # first step, to show the run is under way (without its loss: nothing is read for it)
    first = result.step == 1 + (run.resumed_from or 0)
    first_compiled = first and run.cfg.compile
    if not run.plain or not ((result.read and run.due(result.step, run.cfg.log_every)) or first):
        return
    parts = [f"step {result.step}/{run.cfg.steps}"]
    if result.read:
        parts.append(f"loss {result.loss:.4f}" if not result.skipped else f"skipped (non-finite {result.what})")
    if state.val_history:
        parts.append(f"val {state.val_history[-1]['val_loss']:.4f} (step {state.val_history[-1]['step']})")
    parts.append(f"lr {result.lr:.2e}")
    if first_compiled:
        parts.append(f"compiled in {run.first_step_s:.1f}s")
    elif rate:
        parts.append(f"{rate[0]:,.0f} tok/s")
        util = perf.mfu(run.flops_per_token, rate[0] / run.world.size, run.peak)
        if util is not None:
            parts.append(f"MFU {100 * util:.1f}%")
        parts.append(f"ETA {_duration(rate[1] * (run.cfg.steps - result.step))}")
    run.say(" | ".join(parts))


def evaluate_run(run: Run, state: TrainState) -> float:
    """Evaluate the model at the step just completed (its size and progress shown); record it in
    the state and the metrics, with bits per byte and perplexity for text corpora."""
    T = state.model.config.block_size
    if run.bar is not None:
        run.bar.set_postfix_str(f"evaluating {run.eval_windows:,} windows", refresh=True)
    elif run.plain:
        run.say(f"step {state.step}: evaluating {run.eval_windows:,} windows ({run.eval_windows * T:,} tokens)")
    t0, last = time.perf_counter(), [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        if run.bar is not None:
            run.bar.set_postfix_str(f"evaluating {done:,}/{total:,} windows", refresh=True)
        elif run.plain and time.perf_counter() - last[0] >= EVAL_PROGRESS_EVERY_S and done < total:
            last[0] = time.perf_counter()
            run.say(f"step {state.step}: evaluated {done:,}/{total:,} windows")

    stats = evaluate_stats(state.model, run.dataset, run.cfg.batch_size, run.device, run.amp, run.world,
                           windows=run.eval_windows, token_bytes=run.token_bytes,
                           on_batch=progress if run.world.is_main else None)
    val_loss = stats["loss"]
    state.record_eval(val_loss)
    extra = {}
    if stats.get("bpb") is not None:
        extra.update(val_bpb=stats["bpb"], val_ppl=stats["ppl"])
        state.val_history[-1].update(val_bpb=stats["bpb"], val_ppl=stats["ppl"])
    run.metrics.write(step=state.step, val_loss=val_loss, eval_tokens=stats["tokens"], **extra,
                      **({"optimal_loss": run.optimal} if run.optimal else {}))
    if run.plain:
        text = f"step {state.step}: val {val_loss:.4f}"
        if "val_bpb" in extra:
            text += f" ({extra['val_bpb']:.4f} bits per byte, perplexity {extra['val_ppl']:.2f})"
        run.say(text + f" over {stats['tokens']:,} target tokens in {time.perf_counter() - t0:.1f}s")
    return val_loss


@torch.no_grad()
def evaluate(model, dataset, batch_size: int, device: torch.device, amp_ctx,
             world: Optional[distributed.World] = None, windows: Optional[int] = None) -> float:
    """Mean loss over every non-ignored target of the held-out set (split across ranks); the
    first ``windows`` windows of it (None: the dataset's default)."""
    return evaluate_stats(model, dataset, batch_size, device, amp_ctx, world, windows=windows)["loss"]


@torch.no_grad()
def evaluate_stats(model, dataset, batch_size: int, device: torch.device, amp_ctx,
                   world: Optional[distributed.World] = None, windows: Optional[int] = None,
                   token_bytes: Optional[torch.Tensor] = None,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """{"loss": mean loss per target token (nats), "tokens": targets, and with ``token_bytes``
    (bytes of text per token id) "bpb": bits per byte of the targets' text and "ppl":
    perplexity}. ``on_batch(windows done, windows in all)`` after each batch of this rank."""
    world = world or distributed.World()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64)
    count = 0
    n_windows = dataset.eval_windows(windows)
    done = 0
    try:
        for x, y in world.shard(dataset.eval_batches(batch_size, windows)):
            done += x.shape[0] * world.size
            mask = y != dataset.ignore_index
            n = int(mask.sum())
            if n:
                if token_bytes is not None:
                    n_bytes += token_bytes[y[mask]].sum()
                x, y = x.to(device), y.to(device)
                with amp_ctx():  # the fused head + loss: the (B, T, V) logits are never built
                    _, loss = model(x, y, dataset.ignore_index)
                total += loss.double() * n
                count += n
            if on_batch is not None:
                on_batch(min(done, n_windows), n_windows)
    finally:
        model.train(was_training)
    if world.enabled:
        sums = world.sum_(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device),
                                       n_bytes.to(device)]))
        total, count, n_bytes = sums[0], int(sums[1]), sums[2]
    loss = float(total) / max(count, 1)
    out = {"loss": loss, "tokens": count}
    if token_bytes is not None and float(n_bytes) > 0:
        out["bpb"] = float(total) / math.log(2) / float(n_bytes)
        out["ppl"] = math.exp(min(loss, 700.0))
    return out


def save_checkpoint(state: TrainState, out_dir: str) -> str:
    """Write ``state`` as checkpoints/step_<step>/ (atomically), keeping the last ``keep_last``
    and the best by validation loss. Rank 0's state: weights and optimizer are the same on
    every rank, and the data stream is shared."""
    path = ckpt.save_training_checkpoint(out_dir, state.step, state.model, state.optimizer,
                                         state.checkpoint_state(), state.rng, state.cfg.keep_last,
                                         keep_steps=(state.best_step,) if state.best_step >= 0 else ())
    plot.write_loss_png(out_dir)  # loss.png at each checkpoint (skipped quietly without matplotlib)
    return path


def save_on_all_ranks(run: Run, state: TrainState, interrupts: Interrupts) -> None:
    """Rank 0 saves; every rank waits for the save (and learns if it failed)."""
    read_steps(run, state)
    run.last_ckpt = run.world.run_on_main(lambda: save_checkpoint(state, run.out_dir))
    interrupts.saved_step = state.step


def on_interrupt(run: Run, state: TrainState, interrupts: Interrupts, terminated: bool = False) -> None:
    """A KeyboardInterrupt reached the loop: save the last whole step so that --resume loses
    nothing, unless it came in the middle of a step's update and bookkeeping (its state is
    then half-written), and say how to continue. No collectives: other ranks may be gone."""
    if not run.world.is_main:
        return
    whole = interrupts.updating is None or interrupts.saved_step == interrupts.updating  # saved just before
    if whole and state.step > interrupts.saved_step:
        read_steps(run, state)
        run.last_ckpt = save_checkpoint(state, run.out_dir)
        interrupts.saved_step = state.step
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    if whole:
        run.say(f"{what}: saved {run.last_ckpt}; continue with --resume --out {run.out_dir}")
    else:
        run.say(f"{what} in the middle of step {interrupts.updating}'s update: not saved; "
                f"--resume --out {run.out_dir} continues from {run.last_ckpt or 'the start'}")


class Interrupts:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request that training honours at the
    next step boundary all ranks agree on; a second one raises KeyboardInterrupt (Terminated
    if a SIGTERM came) at once. Installed only in the main thread over Python's default
    handlers (never over someone else's), restored afterwards. Also tracks what an interrupt
    may save: ``updating`` is the step whose update and bookkeeping are under way (None
    between steps), ``saved_step`` the last step saved."""

    def __init__(self, saved_step: int = -1, install: bool = True, announce: bool = True):
        self.requested, self.by_sigterm, self._old, self.announce = False, False, {}, announce
        self.saved_step, self.updating = saved_step, None
        if not install or threading.current_thread() is not threading.main_thread():
            return
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        term = signum == signal.SIGTERM
        if self.requested:
            raise Terminated() if term or self.by_sigterm else KeyboardInterrupt()
        self.requested, self.by_sigterm = True, term
        if self.announce:
            print("\nbarkgpt: SIGTERM: stopping at the next step boundary (saved there); a second SIGTERM or "
                  "Ctrl-C stops at once" if term else
                  "\nbarkgpt: stopping at the next step boundary (saved there); Ctrl-C again to stop now",
                  file=sys.stderr, flush=True)

    def begin_update(self, step: int) -> None:
        self.updating = step

    def end_step(self) -> None:
        self.updating = None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}




# ---- opening a run: resume or a new directory --------------------------------------------------

def _open_run(cfg: TrainConfig, config: Optional[TrainConfig], overrides: Dict[str, Any], resume: bool,
              world_size: int, say, lock: Optional[RunLock] = None) -> tuple:
    """Pick the run directory or load the checkpoint to resume: (cfg, resumed). An existing
    run directory is locked first (``lock``; None: not locked), so no other run uses it meanwhile."""
    lock = lock if lock is not None else RunLock(enabled=False)
    resumed = None
    if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise TrainingError(f"--out {cfg.out!r} is a file, not a directory; choose another --out")
    if resume:
        if cfg.out is None:
            raise TrainingError("resume needs the run directory: pass out=... (--out)")
        if not os.path.isdir(cfg.out):
            raise TrainingError(f"nothing to resume: the run directory --out {cfg.out!r} does not exist")
        lock.acquire(cfg.out)
        latest = ckpt.latest_checkpoint(cfg.out)
        if latest is None:
            raise TrainingError(f"nothing to resume in {cfg.out!r}: it has no checkpoints")
        resumed = ckpt.load_training_checkpoint(latest)
        saved = TrainConfig(**resumed["state"]["train_config"])
        before = dataclasses.replace(saved)  # the schedule the run had
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
        # The run's identity comes from the checkpoint; only RESUME_MAY_CHANGE may differ. What
        # was given: the keywords (CLI flags), over the fields of a TrainConfig that are not its defaults.
        given = {}
        if config is not None:
            defaults = TrainConfig()
            given = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
                     if getattr(config, f.name) != getattr(defaults, f.name)}
            if isinstance(given.get("model"), GPTConfig):
                given["model"] = given["model"].to_dict()
        given.update(overrides)
        for k, v in given.items():
            if k == "data" and _data_path(v) == _data_path(saved.data):
                continue  # the same file, named another way (or relative, as older runs stored it)
            if k in RESUME_MAY_CHANGE or k == "out":
                setattr(saved, k, v)
            elif v != getattr(saved, k):
                raise TrainingError(f"{k}={v!r} differs from the run being resumed ({getattr(saved, k)!r}); "
                                    f"a resumed run keeps its settings (only {', '.join(RESUME_MAY_CHANGE)} "
                                    f"may change): drop the option or start a new run in another --out")
        saved.out = cfg.out
        _replan_decay(before, saved, resumed["state"]["step"], say)
        cfg = saved
    else:
        # (with no --out, a default run directory is reserved once the run starts: setup)
        if cfg.out is not None and os.path.isdir(cfg.out):
            def holds_run():
                return ckpt.list_checkpoints(cfg.out) or os.path.exists(os.path.join(cfg.out, ckpt.MODEL_FILE))

            # Checked before the lock file is made: nothing is written into someone else's directory.
            foreign = [] if holds_run() else sorted(n for n in os.listdir(cfg.out)
                                                    if n not in RUN_LEFTOVERS and not n.startswith(".tmp-"))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise TrainingError(f"--out {cfg.out!r} is not empty and is not a barkgpt run (it holds {shown}); "
                                    f"its files would be overwritten: choose a new or empty directory")
            lock.acquire(cfg.out)  # a run using it is named before anything else is said
            if holds_run():
                raise TrainingError(f"{cfg.out!r} already holds a training run; pass --resume to continue it "
                                    f"or choose another --out")
        # A path relative to where the run started would not resolve from elsewhere on --resume.
        # Not under torchrun: there each machine resolves a relative path in its own directory.
        if world_size == 1:
            cfg.data = _data_path(cfg.data)
            if cfg.val_data is not None:
                cfg.val_data = _data_path(cfg.val_data)
    return cfg, resumed


def _replan_decay(before: TrainConfig, cfg: TrainConfig, step: int, say) -> None:
    """A resumed run given another number of steps: from the step it resumes at, the cosine
    decay runs from the learning rate it has reached to the minimum at the new last step (a
    finished run that is extended trains on at the minimum). Warmup stays as it was."""
    if cfg.steps == before.steps or step >= cfg.steps:
        return
    warmup = before.warmup_steps if before.warmup_steps is not None else min(100, before.steps // 20)
    cfg.warmup_steps = warmup
    if step < warmup:
        return  # still warming up: the decay after it is planned for the new steps from the start
    cfg.decay_from = [step, lr_at(step, before)]
    say(f"steps {before.steps} -> {cfg.steps}: the learning rate decays from {cfg.decay_from[1]:.3g} at step "
        f"{step} to {cfg.lr * cfg.min_lr_ratio:.3g} at step {cfg.steps}")


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


def _make_run_dir(out: str, lock: Optional[RunLock] = None) -> None:
    """Created only once the run is known to start (no empty run directories from bad settings),
    and locked."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create the run directory --out {out!r}: {e.strerror or e}") from None
    if lock is not None:
        lock.acquire(out)


# What a run that has saved nothing yet leaves in its directory (with temp files named .tmp-*):
# any other file in an --out that holds no run makes it someone else's directory.
LOCK_FILE = ".barkgpt.lock"
RUN_LEFTOVERS = {ckpt.CKPT_DIR, "metrics.jsonl", "train_config.json", LOCK_FILE, plot.LOSS_PNG}


class RunLock:
    """An exclusive lock on a run directory while a run uses it (``flock`` on ``.barkgpt.lock``,
    which names the holder). The kernel drops it when the process ends, however it ends, so a
    killed run never blocks its own resume."""

    def __init__(self, enabled: bool = True):
        self.fd: Optional[int] = None
        self.enabled = enabled

    def acquire(self, out: str) -> None:
        if self.fd is not None or not self.enabled:
            return
        path = os.path.join(out, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the mode the umask allows
        except OSError as e:
            raise TrainingError(f"cannot lock the run directory --out {out!r}: {e.strerror or e}") from None
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "its process is starting"
            except OSError:  # (Windows: the holder's lock covers what it wrote)
                holder = "another process"
            finally:
                os.close(fd)
            raise TrainingError(f"--out {out!r} is in use by another barkgpt run ({holder}); wait for it to end "
                                f"or stop it, or choose another --out")
        info = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {' '.join(sys.argv)}")
        os.ftruncate(fd, 0)
        os.write(fd, info.encode()[:4000])
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` for this process without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # a file system without locks (some network mounts): run, but say so
        warnings.warn(f"cannot lock the run directory ({e.strerror or e}): nothing stops a second run "
                      f"from using it at the same time", stacklevel=2)
        return True


def write_run_file(path: str, data: bytes) -> None:
    """Replace a run file atomically (temp file, fsync, rename) with the mode a plain ``open``
    gives it: the umask's, so a shared run stays readable to whom the user meant."""
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".tmp-{name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- the data a run trains on: recorded, and checked on resume --------------------------------

_PIECE, _PIECES = 1 << 16, 16


def describe_data(dataset) -> Dict[str, Any]:
    """The dataset's description, plus for a file its size and a cheap content fingerprint:
    sha256 of 16 pieces of 64 KiB spread evenly over it (the whole file up to 1 MiB)."""
    info = dict(dataset.describe())
    path = info.get("path")
    if path is None:
        return info  # built in (bark): nothing to change
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _PIECE * _PIECES:
            h.update(f.read())
        else:
            for i in range(_PIECES):
                f.seek((size - _PIECE) * i // (_PIECES - 1))
                h.update(f.read(_PIECE))
    info.update(bytes=size, fingerprint=h.hexdigest()[:32])
    return info


def check_same_data(recorded: Optional[Dict[str, Any]], current: Dict[str, Any], allow: bool, say) -> None:
    """Refuse to resume on data other than the run's (compared by size and fingerprint; older
    runs, which recorded neither, by token count) unless ``allow``."""
    if not recorded or "path" not in current:
        return
    if "bytes" in recorded:
        if recorded["bytes"] != current["bytes"]:
            what = f"it had {recorded['bytes']:,} bytes and now has {current['bytes']:,}"
        elif recorded.get("fingerprint") != current["fingerprint"]:
            what = f"its content differs (same size, {current['bytes']:,} bytes)"
        else:
            return
    elif "tokens" in recorded and recorded["tokens"] != current["tokens"]:
        what = f"it had {recorded['tokens']:,} tokens and now has {current['tokens']:,}"
    else:
        return
    if allow:
        say(f"the data file {current['path']!r} changed since the checkpoint ({what}); resuming on it as asked")
        return
    raise TrainingError(f"the data file {current['path']!r} changed since the run was saved: {what}. Resuming "
                        f"would not continue the same run; restore the data, start a new run, or pass "
                        f"--allow-data-change (allow_data_change=True) to resume on it anyway")



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
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step.
    A run whose steps were changed on resume (cfg.decay_from = [s0, lr0]) decays from lr0 at
    step s0 to the minimum at its new last step instead: the learning rate never jumps (a
    finished run that is extended trains on at the minimum)."""
    peak = cfg.lr if cfg.lr is not None else cfg.defaults()["lr"]
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, cfg.steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    min_lr = peak * cfg.min_lr_ratio
    start, top = warmup, peak
    if cfg.decay_from is not None and step >= cfg.decay_from[0]:
        start, top = int(cfg.decay_from[0]), float(cfg.decay_from[1])
    span = max(1, cfg.steps - start - 1)  # the last step (steps - 1) gets exactly the minimum
    progress = min(1.0, (step - start) / span)
    return min_lr + 0.5 * (top - min_lr) * (1 + math.cos(math.pi * progress))


def _reserve_out_dir(base: str, lock: Optional[RunLock] = None) -> str:
    """The first of base, base-2, base-3 ... that this call creates (mkdir is atomic: two runs
    started together never share one), locked."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    i = 1
    while True:
        path = base if i == 1 else f"{base}-{i}"
        try:
            os.mkdir(path)
        except FileExistsError:
            i += 1
            continue
        if lock is not None:
            lock.acquire(path)
        return path


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _val_source(dataset) -> str:
    if isinstance(dataset, BarkCorpus):
        return "the bark corpus's held-out set"
    if getattr(dataset, "val_path", None):
        return os.path.basename(dataset.val_path)
    if getattr(dataset, "has_val", True):
        return f"the last {dataset.val_fraction:.0%} of {dataset.name}"
    return f"{dataset.name} (no held-out share: the training data)"


def _duration(sec: float) -> str:
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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

    def __init__(self, path: Optional[str], resume_step: Optional[int], say=None):
        self.path = path
        self.f = None
        if path is None:
            return
        if resume_step is None:  # a new run: whatever a run that crashed before its first save left
            self.f = open(path, "w", encoding="utf-8")
            return
        if os.path.exists(path):
            # Drop events after the checkpoint we resume from: they will be logged again.
            keep, bad = _metrics_lines(path, resume_step)
            if bad and say is not None:
                say(f"{path}: dropped {len(bad)} unreadable line{'s' if len(bad) > 1 else ''} (line "
                    f"{', '.join(map(str, bad[:3]))}{' ...' if len(bad) > 3 else ''}): each line should be a "
                    f"JSON object with an integer step")
            write_run_file(path, b"".join(keep))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, **event) -> None:
        if self.f is not None:
            self.f.write(json.dumps(event) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _metrics_lines(path: str, resume_step: int) -> tuple:
    """(lines to keep: events up to ``resume_step``, numbers of the unreadable lines). A last
    line without its newline was cut by a crash: dropped without a word."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        lines.pop()  # cut by a crash
    keep, bad = [], []
    for n, line in enumerate(lines, 1):
        try:
            event = json.loads(line.decode("utf-8"))
            step = event["step"] if isinstance(event, dict) else None
        except (ValueError, KeyError):
            step = None
        if isinstance(step, bool) or not isinstance(step, int):
            bad.append(n)
        elif step <= resume_step:
            keep.append(line + b"\n")
    return keep, bad


