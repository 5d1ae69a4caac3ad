"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node N -m barkgpt train ...`` starts N processes; each finds its place
in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...)
and :func:`init` joins them into one process group (gloo for CPU tensors, NCCL for CUDA ones).

How a run is split, so that N processes compute what one process with N times the batch would:

- ``batch_size`` is the per-process micro-batch. Every rank draws the *global* micro-batch
  (``batch_size * world_size`` rows) from the same data generator and keeps its own rows, so
  the data position (the generator state) is the same whatever the world size: a checkpoint
  resumes on any number of processes that divides the global micro-batch.
- DDP averages gradients over ranks, only on the last micro-step of an accumulated batch.
  barkgpt/train.py weights each micro-batch's mean loss by its share of the real (non-ignored)
  targets of the whole step on all ranks (counted with one small all-reduce), so the average is
  the gradient of the mean over every target, padded rows (the bark corpus) included.
- Rank 0 alone decides (the run directory, what to resume), shows progress and writes files;
  what it decides or fails with is shared with every rank, so no rank waits forever on a
  rank that has already given up.

Outside torchrun (or with ``WORLD_SIZE=1``) every helper here is a no-op and training is
exactly the single-process loop.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
from typing import Callable, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def env_world() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) when not launched by it."""
    def get(name: str, default: int) -> int:
        v = os.environ.get(name, "")
        try:
            return int(v) if v != "" else default
        except ValueError:
            raise RuntimeError(f"environment variable {name}={v!r} is not an integer") from None

    world = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local = get("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


class World:
    """This process's place in the run, and the collectives training needs.

    ``World()`` is the single-process world; :func:`init` builds the distributed one."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- devices ---------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda`` means the GPU of this local rank."""
        if not self.enabled or device.type != "cuda":
            return device
        if device.index is not None:  # refused on every rank alike, so none is left waiting
            raise ValueError(f"under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda "
                             f"(or auto), not {device}")
        count = torch.cuda.device_count()
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        if per_machine > count:
            raise ValueError(f"{per_machine} processes were started on a machine that shows {count} GPU(s); "
                             f"start at most {count} per machine (--nproc_per_node {count}) or use --device cpu")
        if self.local_rank < count:
            index = self.local_rank
        elif count == 1:  # a launcher that shows each process only its own GPU
            index = 0
        else:
            raise ValueError(f"local rank {self.local_rank} has no GPU: this machine shows {count}; start at "
                             f"most {count} processes per machine (--nproc_per_node)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    # ---- decisions made once -----------------------------------------------------------------
    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give every rank its result, or raise its exception on every
        rank (marked ``reported_by_main`` on the others, so the CLI prints it once). This is
        also the barrier that keeps ranks from running ahead of rank 0's saves."""
        if not self.enabled:
            return fn()
        box: list = [None]
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # KeyboardInterrupt too: the other ranks must not wait
                error = e
                box[0] = ("error", _portable_error(e) if isinstance(e, Exception)
                          else RuntimeError(f"rank 0 stopped: {type(e).__name__}"))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "error":
            value.reported_by_main = True
            raise value
        return value

    # ---- data ---------------------------------------------------------------------------------
    def local_batch(self, dataset, batch_size: int, generator: torch.Generator):
        """This rank's ``batch_size`` rows of the global micro-batch drawn from ``generator``."""
        if not self.enabled:
            return dataset.get_batch(batch_size, generator)
        # Every rank draws the same global micro-batch positions but reads only its own rows.
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return dataset.get_batch(batch_size * self.size, generator, rows=rows)

    def seed_dropout(self, data_gen: torch.Generator) -> None:
        """Give each rank its own dropout stream, derived from the shared data position and the
        rank: a resumed run (same world size) sees the very same masks, and only rank 0's RNG
        state needs saving."""
        if not self.enabled:
            return
        h = hashlib.sha256(data_gen.get_state().numpy().tobytes())
        h.update(self.rank.to_bytes(4, "little"))
        torch.manual_seed(int.from_bytes(h.digest()[:8], "little") >> 1)

    # ---- model ---------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` (which keeps its own parameters, so the
        optimizer and checkpoints use ``model`` itself); ``model`` unchanged in one process."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The constructor broadcasts rank 0's weights, so every rank starts identical.
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def grad_sync(self, ddp_model: torch.nn.Module, sync: bool):
        """Context for one micro-step's forward + backward: gradients are all-reduced only when
        ``sync`` (the last micro-step); earlier ones just accumulate locally."""
        if not self.enabled or sync:
            return contextlib.nullcontext()
        return ddp_model.no_sync()

    # ---- numbers ----------------------------------------------------------------------------
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (gloo has no AVG: sum, then divide)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (and return it)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def shard(self, items):
        """Every ``size``-th item of an iterable, starting at ``rank`` (work split across ranks)."""
        for i, item in enumerate(items):
            if i % self.size == self.rank:
                yield item


def _portable_error(e: Exception) -> Exception:
    """``e`` itself when it pickles (so other ranks raise the same type), else a RuntimeError."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def init() -> World:
    """The world of this process: joins the process group when launched by torchrun with more
    than one process, or uses the one the caller (or an earlier train()) initialized."""
    rank, size, local = env_world()
    if size == 1:
        return World()
    if not dist.is_initialized():
        # gloo serves CPU tensors (and object broadcasts), NCCL CUDA ones: the device type may
        # only be known once rank 0 has read the checkpoint to resume.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
        # Kept for the life of the process (re-creating a group after destroying it is not
        # reliable with gloo): a second train() in the same torchrun script reuses it.
        atexit.register(_destroy)
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise RuntimeError("the initialized process group does not match RANK/WORLD_SIZE")
    return World(rank, size, local)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resume_batch_size(batch_size: int, saved_world: int, world: int) -> int:
    """Per-process batch size that keeps a checkpoint's global micro-batch
    (``batch_size * saved_world`` rows) on ``world`` processes."""
    rows = batch_size * saved_world
    if rows % world:
        raise ValueError(f"the run's global micro-batch of {rows} sequences ({saved_world} processes x "
                         f"batch_size {batch_size}) cannot be split evenly over {world} processes; "
                         f"resume with a number of processes that divides {rows}")
    return rows // world
