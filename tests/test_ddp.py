"""Data-parallel training through torchrun (gloo on CPU, real processes).

Two processes with ``batch_size`` B must train what one process with 2B trains (up to fp32
rounding: DDP averages two half-batch gradients instead of taking one mean), a two-process run
stopped partway must resume as one process, and only rank 0 may write files.

This file is also the worker that torchrun starts (``python test_ddp.py worker SPEC``): it runs
the jobs listed in SPEC through ``barkgpt.train`` on every rank and writes what each rank saw
to ``SPEC.rank<N>.json``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import barkgpt
from barkgpt import distributed
from barkgpt.checkpoint import list_checkpoints

MODEL = dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
BARK = barkgpt.GPTConfig.preset("bark-tiny").to_dict()  # the bark corpus pads: ignored targets
RUN = dict(steps=6, eval_every=3, save_every=3, device="cpu", progress=False, sample=False)
LAUNCH_TIMEOUT = 300  # seconds; a hung rendezvous must fail the test, not the CI job
# Rendezvous/socket failures are the machine's, not barkgpt's: such a launch is retried once.
TRANSIENT = ("connectFullMesh failed", "Address already in use", "EADDRINUSE", "RendezvousConnectionError")


class Crash(Exception):
    pass


# ---- the worker (runs in each torchrun process) ---------------------------------------------------

def _worker(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    rank = int(os.environ["RANK"])
    real_wrap = distributed.World.wrap
    seen = {}
    for job in spec["jobs"]:
        name, kw, stop = job["name"], dict(job["train"]), job.get("stop")
        hook = None
        if stop and stop["with"] == "sigint":
            def hook(step, loss, at=stop["at"]):  # a real Ctrl-C, on rank 0 only
                if step == at and rank == 0:
                    os.kill(os.getpid(), signal.SIGINT)
        elif stop:
            def hook(step, loss, at=stop["at"], exc=stop["with"]):
                if step == at:
                    raise KeyboardInterrupt if exc == "interrupt" else Crash(f"simulated crash after step {at}")
        if kw.get("backend") == "cpp":
            # Every rank must agree before training: one rank failing alone would leave the
            # other waiting in a collective. The failure is then reported by that job's test.
            import torch.distributed as dist

            distributed.init()  # the process group (kept from the jobs before, or made now)
            reason = barkgpt.ops.unavailable_reason("cpp", "cpu")
            ok = torch.tensor([reason is None], dtype=torch.int32)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item():
                seen[name] = {"outcome": "cpp unavailable on a rank", "message": str(reason)}
                continue
        syncs = []
        if job.get("count_syncs"):  # count DDP's gradient all-reduces through a comm hook
            def wrap(world, model, device, real=distributed.World.wrap):
                ddp = real(world, model, device)
                ddp.register_comm_hook(None, lambda pg, bucket: (syncs.append(1),
                                                                 default_hooks.allreduce_hook(pg, bucket))[1])
                return ddp
            distributed.World.wrap = wrap
        try:
            r = barkgpt.train(on_step=hook, log=lambda m: None, **kw)
            seen[name] = {"outcome": "ok", "losses": r.losses, "val": r.val_history, "syncs": len(syncs)}
        except (KeyboardInterrupt, Crash, barkgpt.TrainingError) as e:
            seen[name] = {"outcome": type(e).__name__, "message": str(e),
                          "reported_by_main": getattr(e, "reported_by_main", False)}
        finally:
            distributed.World.wrap = real_wrap
    with open(f"{spec_path}.rank{rank}.json", "w") as f:
        json.dump(seen, f)


# ---- launching -----------------------------------------------------------------------------------

def _torchrun(args, cwd):
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port is picked by the
    rendezvous); returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("BARKGPT_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def _launch(make_args, base, expect_ok=True):
    """``make_args(attempt_dir)`` -> torchrun args; retried once in a fresh directory when the
    launch failed for a transient socket reason."""
    for attempt in range(2):
        d = base / f"attempt{attempt}"
        d.mkdir(parents=True)
        p = _torchrun(make_args(d), cwd=d)
        out = p.stdout + p.stderr
        if (p.returncode == 0) == expect_ok or not any(t in out for t in TRANSIENT) or attempt == 1:
            return p, d
        shutil.rmtree(d)


# ---- shared runs (module scope: each torchrun launch costs seconds on 2 cores) -------------------

@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 200)
    return str(path)


def _single(out, data_file, **kw):
    """One in-process run (the oracle)."""
    return barkgpt.train(out=str(out), data=data_file, model=MODEL, log=lambda m: None,
                         **{**RUN, "backend": "torch", **kw})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_file):
    """One process, batch 8: what two processes with batch 4 must reproduce."""
    return _single(tmp_path_factory.mktemp("one") / "run", data_file, batch_size=8)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data_file):
    """``torchrun -m barkgpt train``: two processes, batch 4 each."""
    cfg = tmp_path_factory.mktemp("cfg") / "model.json"
    cfg.write_text(json.dumps(MODEL))
    args = lambda d: ["-m", "barkgpt", "train", "--config", str(cfg), "--data", data_file,  # noqa: E731
                      "--steps", "6", "--eval-every", "3", "--save-every", "3", "--batch-size", "4",
                      "--device", "cpu", "--backend", "torch", "--out", str(d / "run"),
                      "--no-progress", "--no-sample"]
    p, d = _launch(args, tmp_path_factory.mktemp("cli"))
    assert p.returncode == 0, p.stdout + p.stderr
    return p, str(d / "run")


def _have_cpp():
    return barkgpt.ops.unavailable_reason("cpp", "cpu") is None


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory, data_file):
    """One torchrun launch running several jobs on both ranks, in order."""
    common = dict(data=data_file, model=MODEL, batch_size=4, backend="torch", **RUN)
    dropout = dict(common, model=dict(MODEL, dropout=0.1))

    def args(d):
        jobs = [
            # stopped by an exception after step 5: resumes from the step-3 checkpoint
            dict(name="crash", train=dict(common, out=str(d / "crash")), stop={"at": 5, "with": "crash"}),
            # dropout on: the full run, then the same run Ctrl-C'd after step 4 and resumed on 2 ranks
            dict(name="dropout_full", train=dict(dropout, out=str(d / "dropout_full"))),
            dict(name="dropout_cut", train=dict(dropout, out=str(d / "dropout_cut")),
                 stop={"at": 4, "with": "interrupt"}),
            # SIGINT on rank 0 alone as step 2 ends: both ranks stop after step 3 (where rank 1
            # learns of it, in the loss all-reduce), with a checkpoint there; then resumed
            dict(name="sigint_cut", train=dict(dropout, out=str(d / "sigint")), stop={"at": 2, "with": "sigint"}),
            dict(name="sigint_resumed", train=dict(out=str(d / "sigint"), resume=True, progress=False,
                                                   sample=False)),
            dict(name="dropout_resumed", train=dict(out=str(d / "dropout_cut"), resume=True, progress=False,
                                                    sample=False)),
            # gradient accumulation: 2 micro-steps of 2 rows per rank, synced on the second only
            dict(name="accum", train=dict(common, batch_size=2, grad_accum=2, out=str(d / "accum")),
                 count_syncs=True),
            # the bark corpus: ranks hold different numbers of real (non-pad) targets
            dict(name="bark", train=dict(common, data="bark", model=BARK, out=str(d / "bark"))),
            # rank 0 refuses a taken --out: every rank must stop with its error
            dict(name="taken", train=dict(common, out=str(d / "dropout_full"))),
        ]
        if _have_cpp():
            jobs.append(dict(name="cpp", train=dict(common, backend="cpp", out=str(d / "cpp"))))
        spec = d / "spec.json"
        spec.write_text(json.dumps({"jobs": jobs}))
        return [os.path.abspath(__file__), "worker", str(spec)]

    p, d = _launch(args, tmp_path_factory.mktemp("worker"))
    assert p.returncode == 0, p.stdout + p.stderr
    seen = [json.loads((d / f"spec.json.rank{r}.json").read_text()) for r in (0, 1)]
    return d, seen, p


# ---- helpers -----------------------------------------------------------------------------------

def _assert_weights_close(run_dir, model, **tol):
    other = barkgpt.load(run_dir)
    a, b = other.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **(tol or dict(rtol=1e-4, atol=1e-5)))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _files(run_dir):
    out = set()
    for root, _, names in os.walk(run_dir):
        out |= {os.path.relpath(os.path.join(root, n), run_dir) for n in names}
    return out


# ---- the tests -----------------------------------------------------------------------------------

def test_two_processes_weight_every_real_target_like_one_process(worker_runs, tmp_path):
    # The step's gradient is that of the mean over all real targets of the global batch, however
    # the pad targets fall between the ranks (not the mean of the two ranks' means).
    d, seen, _ = worker_runs
    assert seen[0]["bark"]["outcome"] == "ok", seen[0]["bark"]
    one = barkgpt.train(out=str(tmp_path / "one"), data="bark", model=BARK, batch_size=8, backend="torch",
                        log=lambda m: None, **RUN)
    assert seen[0]["bark"]["losses"] == pytest.approx(one.losses, rel=1e-6)
    _assert_weights_close(str(d / "bark"), one.model)


def test_two_processes_train_what_one_process_with_the_global_batch_trains(one_process, cli_run, data_file,
                                                                          tmp_path):
    p, run = cli_run
    _assert_weights_close(run, one_process.model)
    ev, ref = _metrics(run), _metrics(one_process.out_dir)
    # rank 0 alone logs: the same events, once each
    assert [sorted(e) + [e["step"]] for e in ev] == [sorted(e) + [e["step"]] for e in ref]
    with open(os.path.join(list_checkpoints(run)[-1][1], "state.json")) as f:
        state = json.load(f)
    assert state["world_size"] == 2
    # every step's loss (the mean over both ranks' rows)
    torch.testing.assert_close(torch.tensor(state["losses"]), torch.tensor(one_process.losses), rtol=1e-5,
                               atol=1e-6)
    vals = torch.tensor([e["val_loss"] for e in ev if "val_loss" in e], dtype=torch.float64)
    torch.testing.assert_close(vals, torch.tensor([v["val_loss"] for v in one_process.val_history],
                                                  dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # tokens/s counts both processes' tokens
    assert all(e["tokens_per_sec"] > 0 for e in ev if "loss" in e)
    # rank 0 alone writes files, prints the run header and the summary
    assert _files(run) == _files(one_process.out_dir)
    assert p.stderr.count("barkgpt: ") == 1 and "2 processes" in p.stderr and p.stderr.count("done: ") == 1
    # the comparison can fail: one process with the per-rank batch trains something else
    half = _single(tmp_path / "half", data_file, batch_size=4)
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                   for a, b in zip(half.model.parameters(), one_process.model.parameters()))


def test_two_process_run_stopped_midway_resumes_as_one_process(worker_runs, one_process, cli_run):
    d, seen, _ = worker_runs
    assert [s["crash"]["outcome"] for s in seen] == ["Crash", "Crash"]
    run = str(d / "crash")
    assert [s for s, _ in list_checkpoints(run)] == [3]
    msgs = []
    r = barkgpt.train(out=run, resume=True, progress=False, sample=False, log=msgs.append)
    assert any("batch_size 4 -> 8" in m for m in msgs)  # same global batch on one process
    assert len(r.losses) == 6
    torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(one_process.losses), rtol=1e-5, atol=1e-6)
    _assert_weights_close(one_process.out_dir, r.model)
    _assert_weights_close(cli_run[1], r.model)  # and the uninterrupted two-process run
    # events logged after step 3 by the stopped run were dropped, then logged once
    assert [e["step"] for e in _metrics(run)] == [e["step"] for e in _metrics(one_process.out_dir)]


def test_two_process_resume_is_exact_with_dropout(worker_runs):
    d, seen, _ = worker_runs
    for s in seen:
        assert s["dropout_full"]["outcome"] == "ok"
        assert s["dropout_cut"]["outcome"] == "KeyboardInterrupt"
        assert s["dropout_resumed"]["outcome"] == "ok"
        assert s["dropout_resumed"]["losses"] == s["dropout_full"]["losses"]  # bitwise
        assert s["dropout_resumed"]["val"] == s["dropout_full"]["val"]
    assert seen[0]["dropout_full"]["losses"] == seen[1]["dropout_full"]["losses"]  # one loss for all ranks
    # Ctrl-C saved rank 0's state at the step boundary
    assert [s for s, _ in list_checkpoints(str(d / "dropout_cut"))] == [3, 4, 6]
    # a real SIGINT on rank 0 only: every rank stopped at the same step, saved, and resumed exactly
    for s in seen:
        assert s["sigint_cut"]["outcome"] == "KeyboardInterrupt", s["sigint_cut"]
        assert s["sigint_resumed"]["outcome"] == "ok"
        assert s["sigint_resumed"]["losses"] == s["dropout_full"]["losses"]  # bitwise
    assert [s for s, _ in list_checkpoints(str(d / "sigint"))] == [3, 6]
    full, resumed = barkgpt.load(str(d / "dropout_full")), barkgpt.load(str(d / "dropout_cut"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_accumulation_syncs_gradients_on_the_last_micro_step_only(worker_runs, data_file, tmp_path):
    d, seen, _ = worker_runs
    # this tiny model's gradients fit one DDP bucket: one all-reduce per optimizer step, not per micro-step
    assert [s["accum"]["syncs"] for s in seen] == [RUN["steps"]] * 2
    one = _single(tmp_path / "one", data_file, batch_size=4, grad_accum=2)
    _assert_weights_close(str(d / "accum"), one.model)
    torch.testing.assert_close(torch.tensor(seen[0]["accum"]["losses"]), torch.tensor(one.losses),
                               rtol=1e-5, atol=1e-6)


def test_an_error_of_rank_0_stops_every_rank(worker_runs):
    _, seen, p = worker_runs
    r0, r1 = seen[0]["taken"], seen[1]["taken"]
    assert r0["outcome"] == r1["outcome"] == "TrainingError"
    assert "already holds a training run" in r0["message"] and r1["message"] == r0["message"]
    assert not r0["reported_by_main"] and r1["reported_by_main"]  # the CLI prints it once


def test_cpp_backend_under_ddp(worker_runs, data_file, tmp_path):
    if not _have_cpp():
        pytest.skip(f"the cpp backend is unavailable: {barkgpt.ops.unavailable_reason('cpp', 'cpu')}")
    d, seen, _ = worker_runs
    assert [s["cpp"]["outcome"] for s in seen] == ["ok", "ok"], [s["cpp"] for s in seen]
    one = _single(tmp_path / "one", data_file, batch_size=8, backend="cpp")
    _assert_weights_close(str(d / "cpp"), one.model)
    torch.testing.assert_close(torch.tensor(seen[0]["cpp"]["losses"]), torch.tensor(one.losses),
                               rtol=1e-5, atol=1e-6)


# ---- pieces, in one process --------------------------------------------------------------------

def test_ranks_take_disjoint_rows_of_the_global_micro_batch():
    from barkgpt.data import BarkCorpus

    ds = BarkCorpus()
    whole = ds.get_batch(6, torch.Generator().manual_seed(3))
    parts = [distributed.World(r, 3).local_batch(ds, 2, torch.Generator().manual_seed(3)) for r in range(3)]
    for i in (0, 1):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    single = distributed.World().local_batch(ds, 6, torch.Generator().manual_seed(3))
    assert torch.equal(single[0], whole[0])


def test_dropout_streams_differ_by_rank_and_repeat_on_resume():
    g = torch.Generator().manual_seed(1)

    def stream(rank, size=2):
        distributed.World(rank, size).seed_dropout(g)
        return torch.rand(4)

    a0, a1, again = stream(0), stream(1), stream(0)
    assert not torch.equal(a0, a1) and torch.equal(a0, again)
    before = torch.get_rng_state()
    distributed.World().seed_dropout(g)  # one process: the RNG is left alone
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("batch, saved, world, want", [(4, 2, 1, 8), (4, 2, 4, 2), (8, 1, 2, 4), (3, 1, 1, 3)])
def test_resume_batch_size_keeps_the_global_micro_batch(batch, saved, world, want):
    assert distributed.resume_batch_size(batch, saved, world) == want


def test_resume_batch_size_that_cannot_split_is_an_error():
    with pytest.raises(ValueError, match="global micro-batch of 6 sequences .* cannot be split evenly over 4"):
        distributed.resume_batch_size(3, 2, 4)


def test_env_world(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_world() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(RuntimeError, match="inconsistent launch environment"):
        distributed.env_world()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
