"""A training step captured once as a CUDA graph and replayed (``train(cuda_graph=True)``,
``barkgpt train --cuda-graph``).

The bark presets' step is hundreds of small kernels; launched one by one from Python, the CPU
is the bottleneck. A CUDA graph records the whole step (forward, backward, clipping, optimizer
update, every micro-step) once and replays it with one launch. What the replay reads must sit at
fixed addresses: the step's inputs are copied into static buffers before each replay, the
learning rate is a device tensor the captured optimizer reads, and the outputs are written into
a static tensor that the caller copies.

This module knows nothing of training: barkgpt/train.py builds the step's body. ``CudaGraphs``
is the CUDA side (a side stream for the warm-up, capture, replay); tests substitute a stand-in
that runs the body eagerly on every replay, which is how CPU tests prove the captured function
is the eager step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

WARMUP_STEPS = 3  # eager runs of the body before capture (allocator, optimizer state, kernel caches)


class CudaGraphs:
    """Capture and replay on a CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device

    def unsupported(self) -> Optional[str]:
        """Why graphs cannot run here (None: they can)."""
        if self.device.type != "cuda":
            return f"it needs a CUDA device, and this run is on {self.device}"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    @contextlib.contextmanager
    def side_stream(self):
        """Run the warm-up on a side stream, ordered after and before the current stream's work
        (what torch.cuda.graph expects before a capture)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    def capture(self, body: Callable[[], None]):
        """``body`` recorded into a graph (nothing runs yet); returns an object with ``replay()``.
        torch.cuda.graph registers the default CUDA generator: every replay draws fresh dropout
        masks and advances the generator's offset as the eager step would."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph

    def rng_state(self):
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state) -> None:
        torch.cuda.set_rng_state(state, self.device)


class CapturedStep:
    """``body(skip_update)`` captured on the first call and replayed on every call after.

    ``body`` reads its inputs from buffers the caller fills before each call, and writes its
    outputs into tensors allocated before the capture. Before capturing, the body runs
    ``WARMUP_STEPS`` times on a side stream with ``skip_update=True``: it must leave the
    training state as it found it then (the fused optimizer cancels its update, step count
    included), and the RNG states are put back afterwards, so the warm-up changes nothing a
    checkpoint holds and the first replay is the first real step.
    """

    def __init__(self, body: Callable[[bool], None], api, warmup_steps: int = WARMUP_STEPS):
        self.body = body
        self.api = api
        self.warmup_steps = warmup_steps
        self.graph = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _capture(self) -> None:
        cpu_rng, dev_rng = torch.get_rng_state(), self.api.rng_state()
        with self.api.side_stream():
            for _ in range(self.warmup_steps):
                self.body(True)
        torch.set_rng_state(cpu_rng)
        self.api.set_rng_state(dev_rng)
        self.graph = self.api.capture(lambda: self.body(False))
