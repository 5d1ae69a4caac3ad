"""A Triton kernel that cannot compile or launch on the user's GPU (simulated here: the launch
raises what Triton raises) makes auto dispatch use torch for that op with one warning saying why,
and an explicit backend="triton" raise BackendUnavailable with the reason (issue 19, item 3).
The mechanism is the registry's dispatch (barkgpt.ops), for every op alike."""

import importlib
import warnings

import pytest
import torch

from barkgpt import ops, reference
from barkgpt.registry import BackendUnavailable

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

kutils = importlib.import_module("barkgpt.kernels._utils")
kattn = importlib.import_module("barkgpt.kernels.attention")
kln = importlib.import_module("barkgpt.kernels.layer_norm")
kemb = importlib.import_module("barkgpt.kernels.embedding")
_triton = importlib.import_module("barkgpt._triton")

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not kutils.interpret_mode(),
                                reason="simulates on CPU tensors, Triton in the interpreter")


class _Failing:
    """Stands in for a @triton.jit kernel whose launch fails the way Triton fails on a GPU."""

    def __init__(self, error):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error
        return launch


@pytest.fixture
def triton_first(monkeypatch):
    """CPU tensors dispatched as CUDA ones are: auto tries triton first, then torch."""
    monkeypatch.setattr(ops, "_auto_chain", lambda dev: ["triton", "torch"])
    monkeypatch.setattr(ops, "_kernel_failures", {})
    monkeypatch.setattr(ops, "_warned", set())
    ops._resolved.clear()
    yield
    ops._resolved.clear()


def _attention_inputs():
    return [torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3)]


def test_auto_uses_torch_with_one_warning(monkeypatch, triton_first):
    failing = _Failing(OutOfResources(232448, 101376, "shared memory"))
    monkeypatch.setattr(kattn, "_attention_fwd_kernel", failing)
    q, k, v = _attention_inputs()
    with pytest.warns(RuntimeWarning, match=r"triton backend is unavailable.*attention.*shared memory.*using the "
                                            r"torch backend") as caught:
        out = ops.attention(q, k, v, causal=True)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, reference.attention_ref(q, k, v, True))
    out.sum().backward()  # the torch path is differentiable
    assert q.grad is not None and failing.launches == 1
    # Later calls go straight to torch: no second launch attempt, no second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            torch.testing.assert_close(ops.attention(q, k, v, causal=True), out)
    assert failing.launches == 1
    assert ops.resolve_backend(None, "cpu", "attention", (torch.float32,)) == "torch"
    # Other ops keep their Triton kernels.
    assert ops.resolve_backend(None, "cpu", "layer_norm", (torch.float32,)) == "triton"


def test_explicit_triton_raises_with_the_reason(monkeypatch, triton_first):
    monkeypatch.setattr(kattn, "_attention_fwd_kernel", _Failing(OutOfResources(232448, 101376, "shared memory")))
    q, k, v = _attention_inputs()
    with pytest.raises(BackendUnavailable, match=r"triton.*attention.*failed to compile or launch.*"
                                                 r"OutOfResources.*shared memory"):
        ops.attention(q, k, v, causal=True, backend="triton")
    # ...every time, not only the first (and never silently on torch).
    with pytest.raises(BackendUnavailable, match="failed to compile or launch"):
        ops.attention(q, k, v, causal=True, backend="triton")


def test_any_op_falls_back_the_same_way(monkeypatch, triton_first):
    """A CUDA launch error ("no kernel image" for an architecture) in LayerNorm, a compile
    error in the embedding: same dispatch path, no per-op code."""
    monkeypatch.setattr(kln, "_layer_norm_fwd_kernel", _Failing(
        RuntimeError("Triton Error [CUDA]: no kernel image is available for execution on the device")))
    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)
    with pytest.warns(RuntimeWarning, match="layer_norm.*no kernel image"):
        y = ops.layer_norm(x, w, b)
    torch.testing.assert_close(y, reference.layer_norm_ref(x, w, b, 1e-5))

    from triton.runtime.errors import PTXASError

    monkeypatch.setattr(kemb, "_embedding_add_fwd_kernel", _Failing(PTXASError("ptxas fatal: sm_75 has no bf16")))
    idx, tok, pos = torch.randint(0, 9, (2, 5)), torch.randn(9, 8), torch.randn(8, 8)
    with pytest.warns(RuntimeWarning, match="embedding_add.*PTXASError"):
        out = ops.embedding_add(idx, tok, pos)
    torch.testing.assert_close(out, reference.embedding_add_ref(idx, tok, pos))


def test_other_errors_are_not_hidden(monkeypatch, triton_first):
    """A bug (or an out-of-memory) is not "this GPU cannot run the kernel": it propagates."""
    monkeypatch.setattr(kattn, "_attention_fwd_kernel", _Failing(ValueError("a bug")))
    q, k, v = _attention_inputs()
    with pytest.raises(ValueError, match="a bug"):
        ops.attention(q, k, v, causal=True)
    assert ops._kernel_failures == {}
    assert _triton.kernel_failure(torch.OutOfMemoryError("CUDA out of memory")) is None
    assert _triton.kernel_failure(RuntimeError("CUDA error: an illegal memory access")) is None
