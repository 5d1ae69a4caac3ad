"""train(cuda_graph=True) / --cuda-graph (issue 19 item 5): what a CPU can prove.

The capture logic runs here with a stand-in for the CUDA side (FakeGraphs: ``capture`` keeps
the body, ``replay`` runs it eagerly), so the tests check that the function handed to the
capture is the eager step: same forward/backward code, same losses and weights bitwise, the
learning rate read from its tensor, non-finite steps cancelled on the device, checkpoints and
resume unchanged. The real capture needs a GPU (benchmarks/run_gpu.sh times both modes and
compares them there)."""

import contextlib
import dataclasses
import importlib

import pytest
import torch

import barkgpt
from barkgpt import TrainingError, graphs
from barkgpt.checkpoint import latest_checkpoint, load_training_checkpoint
from barkgpt.cli import main

train_mod = importlib.import_module("barkgpt.train")  # the module (barkgpt.train is the function)
FAST = dict(progress=False, sample=False, backend="torch", log=lambda m: None)


class FakeGraphs:
    """graphs.CudaGraphs on a CPU: the warm-up runs in place of a side stream, capture records
    the body without running it (as a real capture runs no kernel), replay runs it."""

    def __init__(self, device=None):
        self.captures = self.replays = 0
        self.in_warmup = False
        self.device_rng = torch.tensor([7], dtype=torch.uint8)
        self.rng_sets = 0

    def unsupported(self):
        return None

    @contextlib.contextmanager
    def side_stream(self):
        self.in_warmup = True
        try:
            yield
        finally:
            self.in_warmup = False

    def capture(self, body):
        self.captures += 1
        outer = self

        class Graph:
            def replay(self):
                outer.replays += 1
                body()

        return Graph()

    def rng_state(self):
        return self.device_rng.clone()

    def set_rng_state(self, state):
        self.rng_sets += 1
        self.device_rng = state


@pytest.fixture
def fake(monkeypatch):
    """Every run of the test gets a FakeGraphs; the list holds them."""
    made = []

    def api(device):
        made.append(FakeGraphs(device))
        return made[-1]

    monkeypatch.setattr(train_mod, "graph_api", api)
    return made


@pytest.fixture
def spy(monkeypatch):
    """Counts forward_backward calls: the eager step and the captured body call this one function."""
    calls = []
    real = train_mod.forward_backward

    def counted(run, state, *args):
        calls.append("graph" if run.graph is not None else "eager")
        return real(run, state, *args)

    monkeypatch.setattr(train_mod, "forward_backward", counted)
    return calls


def _common(tmp_path, **kw):
    text = tmp_path / "t.txt"
    if not text.exists():
        text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    model = dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    return dict(data=str(text), model=model, steps=6, batch_size=4, grad_accum=2, warmup_steps=3, eval_every=3,
                save_every=3, **FAST, **kw)


def _same_checkpoints(a_dir, b_dir):
    a, b = load_training_checkpoint(latest_checkpoint(a_dir)), load_training_checkpoint(latest_checkpoint(b_dir))
    for part in ("model", "extra"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]  # lr a float, capturable as the eager one's
    assert all(isinstance(g["lr"], float) and not g.get("capturable") for g in oa["param_groups"])
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    sa, sb = dict(a["state"]), dict(b["state"])
    ca, cb = sa.pop("train_config"), sb.pop("train_config")
    assert sa == sb
    assert {k: v for k, v in ca.items() if k not in ("out", "cuda_graph")} == \
        {k: v for k, v in cb.items() if k not in ("out", "cuda_graph")}


def test_captured_step_is_the_eager_step_bitwise(tmp_path, fake, spy):
    """Dropout, two micro-steps, a warmup then cosine lr (a new lr every step), evaluations and
    checkpoints between replays: the graph run's losses, weights, optimizer state, RNG states
    and checkpoints are the eager run's, bit for bit."""
    eager = barkgpt.train(out=str(tmp_path / "eager"), **_common(tmp_path))
    assert spy == ["eager"] * 6
    spy.clear()
    graph = barkgpt.train(out=str(tmp_path / "graph"), cuda_graph=True, **_common(tmp_path))
    api, = fake
    assert api.captures == 1 and api.replays == 6  # captured once, replayed every step
    assert spy == ["graph"] * (graphs.WARMUP_STEPS + 6)  # the warm-up and each replay run the eager code
    assert api.rng_sets == 1  # the device RNG put back after the warm-up
    cfg = train_mod.TrainConfig(**_cfg(tmp_path))
    lrs = [train_mod.lr_at(s, cfg) for s in range(6)]
    assert len(set(lrs)) == 6  # the schedule changes every step: a stale lr tensor would show
    assert graph.losses == eager.losses and all(x == x for x in graph.losses)
    assert graph.val_history == eager.val_history
    for a, b in zip(graph.model.state_dict().values(), eager.model.state_dict().values()):
        assert torch.equal(a, b)
    _same_checkpoints(tmp_path / "graph", tmp_path / "eager")


def _cfg(tmp_path):
    c = _common(tmp_path)
    for k in FAST:
        c.pop(k)
    return c


class Crash(Exception):
    pass


def test_graph_run_resumes_bitwise(tmp_path, fake):
    """A graph run that crashed resumes (as a graph run, or eagerly) exactly as an uninterrupted one."""
    full = barkgpt.train(out=str(tmp_path / "full"), **_common(tmp_path))

    def crash(step, loss):
        if step == 5:
            raise Crash()

    for resume_graph in (True, False):
        out = str(tmp_path / f"part-{resume_graph}")
        with pytest.raises(Crash):
            barkgpt.train(out=out, cuda_graph=True, on_step=crash, **_common(tmp_path))
        resumed = barkgpt.train(out=out, resume=True, cuda_graph=resume_graph, **FAST)
        assert resumed.losses == full.losses
        for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
            assert torch.equal(a, b)
        _same_checkpoints(out, tmp_path / "full")


def test_interrupt_saves_at_the_step_boundary(tmp_path, fake):
    """Ctrl-C in a graph run saves the last whole step, and --resume goes on exactly."""
    def interrupt(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    kw = dict(_common(tmp_path), save_every=0)
    out = str(tmp_path / "g")
    with pytest.raises(KeyboardInterrupt):
        barkgpt.train(out=out, cuda_graph=True, on_step=interrupt, **kw)
    assert latest_checkpoint(out).endswith("step_00000004")
    full = barkgpt.train(out=str(tmp_path / "e"), **kw)
    assert barkgpt.train(out=out, resume=True, cuda_graph=True, **FAST).losses == full.losses


def test_nonfinite_step_is_cancelled_inside_the_graph(tmp_path, fake, monkeypatch):
    """on_nonfinite="skip": the captured update is cancelled on the device (found_inf), as the
    eager fused update is; "stop" names the step when the numbers are read."""
    from barkgpt import ops

    real = ops.linear_cross_entropy
    calls = {"n": 0, "poison": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == calls["poison"] else loss

    monkeypatch.setattr(ops, "linear_cross_entropy", poisoned)
    kw = dict(_common(tmp_path), grad_accum=1, eval_every=100, save_every=0, on_nonfinite="skip")
    calls.update(n=0, poison=4)  # eager: the 4th forward is step 4
    eager = barkgpt.train(out=str(tmp_path / "e"), **kw)
    calls.update(n=0, poison=graphs.WARMUP_STEPS + 4)  # the warm-up runs the forward first
    graph = barkgpt.train(out=str(tmp_path / "g"), cuda_graph=True, **kw)
    assert eager.losses[3] != eager.losses[3] and graph.losses[3] != graph.losses[3]
    assert [x for x in graph.losses if x == x] == [x for x in eager.losses if x == x]
    for a, b in zip(graph.model.state_dict().values(), eager.model.state_dict().values()):
        assert torch.equal(a, b)
    calls.update(n=0, poison=graphs.WARMUP_STEPS + 4)
    with pytest.raises(TrainingError, match="non-finite loss at step 4"):
        barkgpt.train(out=str(tmp_path / "s"), cuda_graph=True, **dict(kw, on_nonfinite="stop"))


def test_warmup_changes_nothing_the_run_holds(tmp_path, fake, monkeypatch):
    """The warm-up runs real steps with the update cancelled: weights, optimizer state and RNG
    are as before it; a capture then a replay gives the first step."""
    seen = {}
    real = graphs.CapturedStep._capture

    def capture(self):
        run = self.body.__self__.run
        state = self.body.__self__.state
        before = [p.detach().clone() for p in state.model.parameters()]
        rng = torch.get_rng_state()
        real(self)
        seen["weights"] = all(torch.equal(a, p) for a, p in zip(before, state.model.parameters()))
        seen["rng"] = torch.equal(rng, torch.get_rng_state())
        seen["steps"] = [float(s["step"]) for s in state.optimizer.state.values()]
        seen["device"] = run.device.type

    monkeypatch.setattr(graphs.CapturedStep, "_capture", capture)
    barkgpt.train(out=str(tmp_path / "g"), cuda_graph=True, **dict(_common(tmp_path), steps=1, save_every=0))
    assert seen["weights"] and seen["rng"] and seen["device"] == "cpu"
    assert seen["steps"] and set(seen["steps"]) == {0.0}  # the optimizer state exists, no step counted


def test_batch_of_another_shape_is_refused(tmp_path, fake, monkeypatch):
    run_state = {}
    real_step = train_mod.GraphStep.step

    def step(self, lr, interrupts):
        run_state["n"] = run_state.get("n", 0) + 1
        if run_state["n"] == 2:
            real_draw = train_mod.draw_batches

            def smaller(run, state):
                batches, counts, n_total = real_draw(run, state)
                return [(x[:, :-1], y[:, :-1]) for x, y in batches], counts, n_total

            monkeypatch.setattr(train_mod, "draw_batches", smaller)
        return real_step(self, lr, interrupts)

    monkeypatch.setattr(train_mod.GraphStep, "step", step)
    with pytest.raises(TrainingError, match="one shape of batch"):
        barkgpt.train(out=str(tmp_path / "g"), cuda_graph=True, **_common(tmp_path))


def _train_with_one_bad_value(tmp_path, monkeypatch, micro, part, where, value):
    """barkgpt.train in graph mode with micro-batch ``micro``'s inputs (part 0) or targets (part 1)
    holding ``value`` at ``where``."""
    real_draw = train_mod.draw_batches

    def bad(run, state):
        batches, counts, n_total = real_draw(run, state)
        pair = [t.clone() for t in batches[micro]]
        pair[part][where] = value
        batches = list(batches)
        batches[micro] = tuple(pair)
        return batches, counts, n_total

    monkeypatch.setattr(train_mod, "draw_batches", bad)
    barkgpt.train(out=str(tmp_path / "g"), cuda_graph=True, **_common(tmp_path))


def test_out_of_range_token_id_is_refused_on_the_host(tmp_path, fake, monkeypatch):
    with pytest.raises(IndexError, match="token id 256 is out of range for a vocabulary of 256"):
        _train_with_one_bad_value(tmp_path, monkeypatch, 0, 0, (0, 0), 256)


def test_out_of_range_target_is_refused_on_the_host(tmp_path, fake, monkeypatch):
    """Inside a graph the loss kernel would treat such a target as ignored: refused before."""
    with pytest.raises(IndexError, match="target -7 is out of range for 256 classes"):
        _train_with_one_bad_value(tmp_path, monkeypatch, -1, 1, (1, 2), -7)


# ---- refusals ---------------------------------------------------------------------------------

def test_cpu_is_refused_clearly_before_the_run_starts(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"cuda_graph \(--cuda-graph\) cannot run here: it needs a CUDA device, "
                                            r"and this run is on cpu \(drop --cuda-graph\)"):
        barkgpt.train(out=str(out), cuda_graph=True, device="cpu", steps=1, **FAST)
    assert not out.exists()  # refused before the run directory was made


def test_cli_flag(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", "--cuda-graph", "--device", "cpu", "--steps", "1", "--out", out, "--no-progress",
                 "--no-sample", "--backend", "torch"]) != 0
    assert "cuda_graph (--cuda-graph) cannot run here: it needs a CUDA device" in capsys.readouterr().err
    from barkgpt.cli import build_parser, _train_config_from_args

    a = build_parser().parse_args(["train", "--cuda-graph"])
    assert _train_config_from_args(a).cuda_graph is True
    assert _train_config_from_args(build_parser().parse_args(["train"])).cuda_graph is False


@pytest.mark.parametrize("kw, msg", [
    (dict(cuda_graph=True, compile=True), "cannot be combined"),
    (dict(cuda_graph="yes"), "cuda_graph must be True or False"),
])
def test_bad_settings(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        barkgpt.train(steps=1, **kw, **FAST)


@dataclasses.dataclass
class _World:
    enabled: bool = False


def _opt(fused=True):
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([p], fused=fused) if fused else torch.optim.AdamW([p])


@pytest.mark.parametrize("world, dtype, fused, msg", [
    (_World(True), torch.bfloat16, True, "not with several processes"),
    (_World(), torch.float16, True, "float16's loss scaler reads the GPU every step"),
    (_World(), torch.bfloat16, False, "needs the fused AdamW"),
    (_World(), torch.bfloat16, True, None),
    (_World(), torch.float32, True, None),
])
def test_what_a_cuda_device_refuses(world, dtype, fused, msg):
    problem = train_mod.cuda_graph_problem(FakeGraphs(), world, dtype, _opt(fused))
    assert problem is None if msg is None else msg in problem


def test_real_api_refuses_a_cpu_device():
    assert "needs a CUDA device" in graphs.CudaGraphs(torch.device("cpu")).unsupported()


def test_resume_may_switch_the_mode():
    assert "cuda_graph" in train_mod.RESUME_MAY_CHANGE


# ---- on a GPU (benchmarks/run_gpu.sh's tests phase) ----------------------------------------------

def _gpu_common(dtype, **kw):
    model = barkgpt.GPTConfig.preset("bark-tiny", dropout=0.1).to_dict()
    return dict(model=model, steps=8, batch_size=16, grad_accum=2, warmup_steps=3, eval_every=4, save_every=4,
                device="cuda", dtype=dtype, **dict(FAST, backend=None), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_captured_run_equals_the_eager_run(tmp_path, dtype):
    """The real capture (Triton kernels, cuBLAS, fused AdamW, dropout from the graph-safe
    generator) trains exactly as the eager loop: same losses, weights and checkpoints."""
    eager = barkgpt.train(out=str(tmp_path / "eager"), **_gpu_common(dtype))
    graph = barkgpt.train(out=str(tmp_path / "graph"), cuda_graph=True, **_gpu_common(dtype))
    assert graph.losses == eager.losses, (graph.losses, eager.losses)
    assert graph.val_history == eager.val_history
    for a, b in zip(graph.model.state_dict().values(), eager.model.state_dict().values()):
        assert torch.equal(a, b)
    _same_checkpoints(tmp_path / "graph", tmp_path / "eager")


@pytest.mark.gpu
def test_gpu_captured_run_resumes_bitwise(tmp_path):
    full = barkgpt.train(out=str(tmp_path / "full"), cuda_graph=True, **_gpu_common("bfloat16"))

    def crash(step, loss):
        if step == 6:
            raise Crash()

    out = str(tmp_path / "part")
    with pytest.raises(Crash):
        barkgpt.train(out=out, cuda_graph=True, on_step=crash, **_gpu_common("bfloat16"))
    resumed = barkgpt.train(out=out, resume=True, cuda_graph=True, **dict(FAST, backend=None))
    assert resumed.losses == full.losses
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
