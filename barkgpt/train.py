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
from . import plot
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


# ---- helpers ---------------------------------------------------------------------------------

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


class _StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a request that training honours at the next step
    boundary all ranks agree on; a second one raises KeyboardInterrupt at once. Installed only in the main thread
    over Python's default handler (never over someone else's), restored afterwards."""

    def __init__(self):
        self.requested, self._old = False, None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nbarkgpt: stopping at the next step boundary (saved there); Ctrl-C again to stop now",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


# ---- the loop -----------------------------------------------------------------------------------

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


def _open_run(cfg: TrainConfig, config: Optional[TrainConfig], overrides: Dict[str, Any], resume: bool,
              world_size: int, say) -> tuple:
    """Pick the run directory or load the checkpoint to resume: (cfg, start_step, resumed)."""
    start_step, resumed = 0, None
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
        start_step = resumed["state"]["step"]
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
    return cfg, start_step, resumed


def _data_path(data: str) -> str:
    return data if data == "bark" else os.path.abspath(data)


def _make_run_dir(out: str) -> None:
    """Created only once the run is known to start (no empty run directories from bad settings)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create the run directory --out {out!r}: {e.strerror or e}") from None


def _train(world: distributed.World, config, resume, log, on_step, overrides) -> TrainResult:
    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"train() got an unknown option {k!r}; options: "
                            f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
        setattr(cfg, k, v)
    if isinstance(cfg.model, GPTConfig):
        cfg.model = cfg.model.to_dict()
    cfg.validate()
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not world.is_main:
        say = lambda msg: None  # noqa: E731  (rank 0 speaks for the run)

    # -- run directory and resume: rank 0 decides (and reads the checkpoint), every rank follows --
    cfg, start_step, resumed = world.run_on_main(
        lambda: _open_run(cfg, config, overrides, resume, world.size, say))

    try:
        device = world.device(resolve_device(cfg.device))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    amp_dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)

    model_cfg = resumed["config"] if resumed else cfg.model_config()
    dataset = load_dataset(cfg.data, model_cfg.block_size)
    if dataset.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"the data has a vocabulary of {dataset.vocab_size} tokens but the model's "
                            f"vocab_size is {model_cfg.vocab_size}; pass --vocab-size {dataset.vocab_size} "
                            f"(vocab_size={dataset.vocab_size}) or pick a preset or config with a vocabulary "
                            f"that large")
    model = BarkGPT(model_cfg, backend=cfg.backend)
    model.tokenizer = dataset.tokenizer
    if resumed:
        model.load_weights(resumed["model"])
    model.to(device)
    backend_name = model.resolved_backend()  # raises here, clearly, if an explicit backend cannot run
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device_type=device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp_dtype == torch.float16))
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)

    losses: List[float] = []
    val_history: List[Dict[str, float]] = []
    best = (math.inf, -1)
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        st = resumed["state"]
        losses = list(st["losses"])
        val_history = list(st["val_history"])
        best = (st["best_val_loss"], st["best_step"])
        if "scaler" in st:
            scaler.load_state_dict(st["scaler"])
        _restore_rng(resumed["extra"], data_gen, device)
        say(f"resuming {os.path.abspath(cfg.out)} from step {start_step}")

    def amp_ctx():
        if amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    ddp_model = world.wrap(model, device)  # `model` itself when there is one process
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    optimal = dataset.optimal_loss(getattr(dataset, "val", None)) if isinstance(dataset, BarkCorpus) else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world.size * model_cfg.block_size  # all ranks
    # MFU per device: tokens/s of all ranks over world.size, against this device's peak (None
    # where the peak is unknown, e.g. CPUs, unless BARKGPT_PEAK_TFLOPS says).
    flops_per_token = model.flops_per_token()
    peak = perf.peak_flops(dtype=amp_dtype, device=device)

    # The run starts: now its directory is made (a default one reserved, so none is left empty
    # by a run that failed to start, and two runs started together never share one).
    if cfg.out is None:
        cfg.out = world.run_on_main(lambda: _reserve_out_dir(
            os.path.join("runs", cfg.preset if cfg.model is None else "custom")))
    else:
        world.run_on_main(lambda: _make_run_dir(cfg.out))
    out_dir = os.path.abspath(cfg.out)
    say(f"barkgpt: {model.num_params():,} parameters, {cfg.steps} steps of {tokens_per_step:,} tokens, "
        f"device {device}, backend {backend_name}, {str(amp_dtype).replace('torch.', '')}, out {out_dir}"
        + (f", {world.size} processes" if world.enabled else ""))
    metrics = _Metrics(os.path.join(out_dir, "metrics.jsonl") if world.is_main else None,
                       start_step if resumed else None)
    if world.is_main:
        with open(os.path.join(out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    def save_checkpoint(step: int, rng: Dict[str, torch.Tensor]) -> str:
        # Rank 0's optimizer and RNG state: the weights and optimizer are the same on every rank.
        state = {"train_config": dataclasses.asdict(cfg), "losses": losses, "val_history": val_history,
                 "best_val_loss": best[0], "best_step": best[1], "dataset": dataset.describe(),
                 "world_size": world.size}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        path = ckpt.save_training_checkpoint(out_dir, step, model, optimizer, state,
                                             rng, cfg.keep_last,
                                             keep_steps=(best[1],) if best[1] >= 0 else ())
        plot.write_loss_png(out_dir)  # loss.png at each checkpoint (skipped quietly without matplotlib)
        return path

    bar = None
    if cfg.progress and world.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5)
    last_ckpt = world.run_on_main(lambda: ckpt.latest_checkpoint(out_dir)) if resumed else None
    model.train()
    t0, tok_done, skipped = time.perf_counter(), 0, 0
    # RNG/data position as of the last completed step: an interrupt mid-step saves these, so
    # the half-done step is redone exactly on resume.
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:  # deterministic kernels (ours always are) and cuBLAS settings; restored after
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rng_done = _rng_tensors(data_gen, device)
    # Ctrl-C: the first one lets the step in progress finish (all ranks agree on where to stop),
    # then saves and stops; a second one stops at once.
    stop = _StopRequest()
    completed, saved_step = start_step, (start_step if resumed else -1)
    updating = False  # between the optimizer update and the end of its step's bookkeeping
    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            world.seed_dropout(data_gen)
            batches = [world.local_batch(dataset, cfg.batch_size, data_gen) for _ in range(cfg.grad_accum)]
            # The step's loss is the mean over every non-ignored target of all micro-batches on all
            # ranks: each micro-batch's mean is weighted by its share of those targets (pad targets
            # differ from batch to batch), times world.size as DDP averages the ranks' gradients.
            counts = [int((y != dataset.ignore_index).sum()) for _, y in batches]
            n_total = max(world.sum_(torch.tensor(float(sum(counts)), dtype=torch.float64,
                                                  device=device if world.enabled else "cpu")).item(), 1.0)
            loss_sum = torch.zeros((), device=device)
            for micro, (x, y) in enumerate(batches):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                weight = counts[micro] * world.size / n_total
                # Under DDP, gradients are averaged across ranks on the last micro-step only.
                with world.grad_sync(ddp_model, micro == cfg.grad_accum - 1):
                    with amp_ctx():
                        _, loss = fwd(x, y, dataset.ignore_index)
                    scaler.scale(loss * weight).backward()
                loss_sum += loss.detach().float() * counts[micro]
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            # the gradients (so gnorm) are the same on every rank; the loss is summed over ranks,
            # with any rank's Ctrl-C, so that all ranks stop after this same step
            summed = world.sum_(torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=device)]))
            step_loss, stop_votes, gnorm_v = torch.stack([summed[0] / n_total, summed[1], gnorm.float()]).tolist()
            stop_after = stop_votes > 0
            done = step + 1
            nonfinite = not (math.isfinite(step_loss) and math.isfinite(gnorm_v)) and not scaler.is_enabled()
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                if cfg.on_nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite {what} at step {done} ({step_loss if what == 'loss' else gnorm_v}); "
                        f"stopping. The last good checkpoint is {last_ckpt or 'none (none saved yet)'}; "
                        f"lower --lr, use float32, or pass --skip-nonfinite (on_nonfinite='skip') to drop "
                        f"such steps")
                skipped += 1
            updating = True
            if nonfinite:
                metrics.write(step=done, event="skipped_nonfinite", what=what)
                losses.append(float("nan"))
            else:
                scaler.step(optimizer)  # with fp16 the scaler itself skips steps with inf grads
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                tok_done += tokens_per_step
            rng_done = _rng_tensors(data_gen, device)
            elapsed = time.perf_counter() - t0
            tps = tok_done / elapsed if elapsed > 0 else 0.0
            if not nonfinite and (done % cfg.log_every == 0 or done == cfg.steps):
                util = perf.mfu(flops_per_token, tps / world.size, peak)
                metrics.write(step=done, loss=step_loss, lr=lr, grad_norm=gnorm_v, tokens_per_sec=tps,
                              elapsed_sec=elapsed, **({"mfu": util} if util is not None else {}))
            # a skipped step still ends its step: the evaluation and checkpoint due there happen
            if done % cfg.eval_every == 0 or done == cfg.steps:
                vl = evaluate(model, dataset, cfg.batch_size, device, amp_ctx, world)
                val_history.append({"step": done, "val_loss": vl})
                if vl < best[0]:
                    best = (vl, done)
                metrics.write(step=done, val_loss=vl, **({"optimal_loss": optimal} if optimal else {}))
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{step_loss:.4f}", "tok/s": f"{tps:,.0f}"}
                if val_history:
                    post["val"] = f"{val_history[-1]['val_loss']:.4f}"
                bar.set_postfix(post, refresh=False)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                # every rank waits for the save (and learns if it failed)
                last_ckpt = world.run_on_main(lambda: save_checkpoint(done, rng_done))
                saved_step = done
            completed, updating = done, False
            if on_step is not None:
                on_step(done, step_loss)
            # One process stops on its own Ctrl-C at once; ranks stop where they all learned of
            # it (the loss all-reduce above). The last step just finishes the run.
            if (stop_after or (stop.requested and not world.enabled)) and done < cfg.steps:
                if saved_step != done:
                    last_ckpt = world.run_on_main(lambda: save_checkpoint(done, rng_done))
                    saved_step = done
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        # Save the last completed step so --resume loses nothing, unless the interrupt came in
        # the middle of a step's update and bookkeeping (its state is then half-written).
        if updating and saved_step == completed + 1:  # interrupted just after its save: complete
            completed, updating = saved_step, False
        if world.is_main:  # no collectives here: other ranks may be gone
            if not updating and completed > saved_step:
                last_ckpt = save_checkpoint(completed, rng_done)
            if updating:
                say(f"interrupted in the middle of step {completed + 1}'s update: not saved; "
                    f"--resume --out {out_dir} continues from {last_ckpt or 'the start'}")
            else:
                say(f"interrupted: saved {last_ckpt}; continue with --resume --out {out_dir}")
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        metrics.close()
        torch.use_deterministic_algorithms(prev_deterministic)

    if resumed and start_step >= cfg.steps:
        say(f"{out_dir} already trained for {start_step} steps (>= --steps {cfg.steps}); nothing to do")
    world.run_on_main(lambda: ckpt.save_model(model, out_dir, step=len(losses)))
    if world.is_main:
        plot.write_loss_png(out_dir)  # the run's final loss.png (skipped quietly without matplotlib)
    elapsed = time.perf_counter() - t0
    tps = tok_done / elapsed if elapsed > 0 and tok_done else 0.0
    final_val = val_history[-1]["val_loss"] if val_history else None
    msg = f"done: {len(losses)} steps"
    if final_val is not None:
        msg += f", val loss {final_val:.4f}"
    if optimal is not None:
        msg += f" (corpus optimum {optimal:.4f}, {100 * (final_val / optimal - 1):+.1f}%)"
    if skipped:
        msg += f", {skipped} non-finite steps skipped"
    say(msg + f"; model saved to {out_dir}")
    sample = None
    if cfg.sample and world.is_main:
        sample = _sample_text(model, dataset, device)
        if sample is not None:
            say(f"sample: {sample}")
    return TrainResult(model=model, out_dir=out_dir, checkpoint=last_ckpt, losses=losses,
                       val_history=val_history, final_val_loss=final_val,
                       best_val_loss=best[0] if best[1] >= 0 else None, optimal_loss=optimal,
                       tokens_per_sec=tps, sample=sample)
