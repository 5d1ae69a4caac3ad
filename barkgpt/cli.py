"""The ``barkgpt`` command line: train, generate, chat, export, tokenize, sweep, plot, presets, info."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


# torch.manual_seed / Generator.manual_seed take any integer in [-2**63, 2**64 - 1] (negative
# ones wrap around modulo 2**64); outside it they fail with "Overflow when unpacking long long".
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _seed_type(lo: int, hi: int):
    def seed(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {v}")
        return v
    return seed


def _fraction(s: str) -> float:
    v = _nonneg_float(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s}")
    return v


def _unit_float(s: str) -> float:
    v = _positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s}")
    return v


def backend_choices() -> tuple:
    """``--backend`` values: auto, then the backends of the op registry in preference order."""
    from .ops import BACKENDS

    return ("auto",) + tuple(BACKENDS)


def _add_sampling_args(p: argparse.ArgumentParser, backend_choices) -> None:
    """The sampling and placement flags generate and chat share."""
    p.add_argument("--top-k", type=_nonneg_int, default=40, help="sample from the k most likely tokens, 0 = all (default: 40)")
    p.add_argument("--top-p", type=_unit_float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=_seed_type(SEED_MIN, SEED_MAX), default=None,
                   help=f"random seed for sampling, an integer in [{SEED_MIN}, {SEED_MAX}] (default: random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--backend", default="auto", choices=backend_choices, help="kernel backend (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; ``.commands`` maps each command to its subparser."""
    from . import __version__
    from .config import PRESETS

    BACKEND_CHOICES = backend_choices()

    p = argparse.ArgumentParser(prog="barkgpt", description="Train small GPT language models fast.")
    p.add_argument("--version", action="version", version=f"barkgpt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (default: the bark preset on the bark corpus, on CPU "
                                     "if there is no GPU)",
                       description="Train a BarkGPT. With no arguments: the 'bark' preset on the built-in bark "
                                   "corpus, then a held-out loss beside the corpus optimum and a sample.")
    t.add_argument("--preset", default="bark", choices=sorted(PRESETS), help="model preset (default: bark)")
    t.add_argument("--config", metavar="JSON", help="GPTConfig JSON file; overrides --preset")
    t.add_argument("--init-from", metavar="DIR", default=None,
                   help="fine-tune a Hugging Face GPT-2 directory (config.json + model.safetensors): its config, "
                        "weights and tokenizer; --data must be tokenized with it (tokenize --tokenizer DIR)")
    t.add_argument("--data", default="bark", help="'bark' (built in), a UTF-8 text file (byte tokens), or a "
                                                  ".bin token file with a .json sidecar, e.g. from "
                                                  "`barkgpt tokenize` (default: bark)")
    t.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="the model's vocabulary instead of the preset's (at least the data's; "
                        "`barkgpt tokenize` prints it)")
    t.add_argument("--val-data", default=None, metavar="FILE",
                   help="validation file of the same kind as --data (then all of --data trains)")
    t.add_argument("--val-fraction", type=_fraction, default=None,
                   help="share of --data held out for validation, in [0, 1); 0 validates on the training "
                        "data (default: 0.1)")
    t.add_argument("--steps", type=_positive_int, default=600,
                   help="optimizer steps; on --resume, a new total (the rest of the lr decay is re-planned "
                        "from the current lr) (default: 600)")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per micro-step (default: the preset's, see `barkgpt presets`)")
    t.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-steps per optimizer step (default: 1)")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (default: the preset's, see `barkgpt presets`)")
    t.add_argument("--min-lr-ratio", type=_nonneg_float, default=0.1, help="final lr / peak lr (default: 0.1)")
    t.add_argument("--warmup-steps", type=_nonneg_int, default=None,
                   help="linear warmup steps (default: 5%% of steps, at most the preset's cap)")
    t.add_argument("--weight-decay", type=_nonneg_float, default=0.1, help="AdamW weight decay on matmul weights (default: 0.1)")
    t.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max gradient norm, 0 disables (default: 1.0)")
    # Training also seeds its data stream with seed + 1, hence one less at the top.
    t.add_argument("--seed", type=_seed_type(SEED_MIN, SEED_MAX - 1), default=1337,
                   help=f"random seed, an integer in [{SEED_MIN}, {SEED_MAX - 1}] (default: 1337)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    t.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="kernels for attention/LayerNorm/embedding (default: auto by device)")
    t.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype (default: bfloat16 on GPUs that support it, else float32)")
    t.add_argument("--out", default=None, help="run directory (default: runs/<preset>, numbered if taken)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on even though the data file changed since the checkpoint")
    t.add_argument("--eval-every", type=_positive_int, default=100, help="validate every N steps (default: 100)")
    ev = t.add_mutually_exclusive_group()
    ev.add_argument("--eval-tokens", type=_positive_int, default=None,
                    help="validation tokens per evaluation, rounded up to whole windows of block_size "
                         "(default: the preset's, or sized to about a tenth of the training time)")
    ev.add_argument("--eval-batches", type=_positive_int, default=None,
                    help="validation batches of --batch-size windows per evaluation (instead of --eval-tokens)")
    t.add_argument("--log-every", type=_positive_int, default=10,
                   help="a log line (and metrics.jsonl entry) every N steps (default: 10)")
    t.add_argument("--save-every", type=_nonneg_int, default=200, help="checkpoint every N steps, 0: only at the end (default: 200)")
    t.add_argument("--keep-last", type=_positive_int, default=3, help="checkpoints kept besides the best (default: 3)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--cuda-graph", action="store_true",
                   help="capture the training step in a CUDA graph and replay it: one launch per step instead "
                        "of hundreds (CUDA, one process, bfloat16/float32; not with --compile)")
    t.add_argument("--deterministic", action="store_true", help="deterministic algorithms: identical weights run to run")
    t.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a non-finite loss/gradient instead of stopping")
    t.add_argument("--no-progress", action="store_true",
                   help="plain log lines every --log-every steps instead of a progress bar (the default "
                        "when stderr is not a terminal)")
    t.add_argument("--nproc-per-node", type=_positive_int, default=None, metavar="N",
                   help="train data-parallel on N processes of this machine (what torchrun --standalone "
                        "--nproc_per_node N does, with one clean message on Ctrl-C)")
    t.add_argument("--no-sample", action="store_true", help="do not print a sample at the end")

    g = sub.add_parser("generate", help="sample text from a trained model",
                       description="Sample from a model saved by `barkgpt train` (its --out directory), "
                                   "model.save() or a Hugging Face GPT-2 directory. One sample is printed "
                                   "token by token as it is generated; several are printed when done.")
    g.add_argument("model", help="run directory, saved model directory or Hugging Face GPT-2 directory")
    g.add_argument("--prompt", default=None, help="prompt text (default: 'User: speak Assistant:' for bark models, a newline otherwise)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=_nonneg_float, default=0.8,
                   help="sampling temperature >= 0: lower is more conservative, 0 = greedy, and a tiny "
                        "one (1e-40) behaves like greedy, tokens tied for the top sharing the draw "
                        "(default: 0.8)")
    g.add_argument("--num-samples", type=_positive_int, default=1, help="samples to draw (default: 1)")
    _add_sampling_args(g, BACKEND_CHOICES)

    c = sub.add_parser("chat", help="talk to a model: type a prompt, read the answer as it is generated",
                       description="Reads a prompt per line from the terminal (or stdin), streams the model's "
                                   "answer, and repeats until end of input (Ctrl-D) or Ctrl-C at the prompt; "
                                   "Ctrl-C during an answer cuts that answer short. Each line is answered on its "
                                   "own. A bark-corpus model gets the line as the corpus asks, "
                                   "'User: LINE Assistant:' (type: speak).")
    c.add_argument("model", help="run directory, saved model directory or Hugging Face GPT-2 directory")
    c.add_argument("--max-new-tokens", type=_positive_int, default=64,
                   help="most tokens per answer; an end-of-text token ends it sooner (default: 64)")
    c.add_argument("--temperature", type=_nonneg_float, default=0.8, help="sampling temperature >= 0, 0 = greedy "
                   "(default: 0.8)")
    _add_sampling_args(c, BACKEND_CHOICES)

    x = sub.add_parser("export", help="write a model in another format (hf: Hugging Face transformers GPT-2)",
                       description="Write a barkgpt model (run or saved model directory) as a directory that "
                                   "transformers.GPT2LMHeadModel.from_pretrained loads: config.json, "
                                   "model.safetensors and the tokenizer (tokenizer.json). Models GPT-2 "
                                   "cannot express (post-LN, no biases, no causal mask) are refused with the reason.")
    x.add_argument("model", help="run directory or saved model directory")
    x.add_argument("out", help="directory to write (must not exist or be empty, unless --force)")
    x.add_argument("--format", default="hf", choices=("hf",), help="output format (default: hf)")
    x.add_argument("--force", action="store_true", help="replace OUT if it exists")

    k = sub.add_parser("tokenize", help="train a BPE tokenizer on a text file and write it as tokens",
                       description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) on a UTF-8 "
                                   "text file and encode the file with it into a .bin token file plus a .json "
                                   "sidecar holding the tokenizer; then `barkgpt train --data FILE.bin`.")
    k.add_argument("input", help="UTF-8 text file")
    k.add_argument("--vocab-size", type=_positive_int, default=8192, help="tokens in the vocabulary, "
                   "at least 257 (default: 8192)")
    k.add_argument("--min-frequency", type=_positive_int, default=2,
                   help="merge only pairs seen at least this often (default: 2)")
    k.add_argument("--out", default=None, help="token file to write (default: INPUT with .bin)")
    k.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="encode with the tokenizer of DIR (a Hugging Face GPT-2 directory, or a barkgpt model "
                        "or run) instead of training one, e.g. to fine-tune with train --init-from DIR")
    k.add_argument("--force", action="store_true", help="overwrite an existing token file and sidecar")
    k.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_sweep_parsers(sub)
    sub.add_parser("presets", help="list the model presets")
    sub.add_parser("info", help="versions and which backends can run on this machine")
    p.commands = dict(sub.choices)
    return p


def _add_sweep_parsers(sub) -> None:
    """`barkgpt sweep` and `barkgpt plot` (barkgpt/sweep.py, barkgpt/plot.py)."""
    from .config import PRESETS

    s = sub.add_parser("sweep", help="train a grid of model configs with one budget and compare them",
                       description="Train every config of a grid on the same data with the same budget per run "
                                   "(steps, tokens or FLOPs), each an ordinary run directory under OUT/runs/, "
                                   "then write OUT/results.md/.csv/.json and charts with a fitted power law. "
                                   "Run it again to continue a stopped sweep; several processes may share OUT.",
                       epilog="example: barkgpt sweep --out sweeps/s1 --data corpus.txt --preset small "
                              "--grid n_layer=1,2,4 n_embd=32,64,128 --flops 1e12")
    s.add_argument("--out", required=True, help="the sweep directory")
    s.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", default=None,
                   help="values to cross: GPTConfig fields (n_layer, n_embd, n_head, block_size ...), preset, "
                        "or training settings (lr, batch_size, weight_decay, seed ...)")
    s.add_argument("--spec", metavar="FILE", default=None,
                   help="JSON or TOML spec file instead of the flags: data, preset, grid, runs (explicit "
                        "configs), budget {steps|tokens|flops: N}, train {...}")
    s.add_argument("--data", default=None, help="'bark' (default) or a text / .bin token file, as for train")
    s.add_argument("--preset", default=None, choices=sorted(PRESETS), help="base config the grid changes (default: bark)")
    b = s.add_mutually_exclusive_group()
    b.add_argument("--steps", type=_positive_int, default=None, help="budget: optimizer steps per run")
    b.add_argument("--tokens", type=_positive_int, default=None, help="budget: training tokens per run")
    b.add_argument("--flops", type=_positive_float, default=None,
                   help="budget: training FLOPs per run (6N + attention per token, see flops_per_token): "
                        "equal compute for every size")
    s.add_argument("--batch-size", type=_positive_int, default=None, help="sequences per micro-step (default: 64)")
    s.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: 1e-2)")
    s.add_argument("--seed", type=_seed_type(SEED_MIN, SEED_MAX - 1), default=None, help="random seed (default: 1337)")
    s.add_argument("--eval-every", type=_positive_int, default=None, help="validate every N steps (default: a tenth of each run)")
    s.add_argument("--list", action="store_true", help="print the runs (index, name, status) and exit")
    s.add_argument("--only", type=_nonneg_int, nargs="+", metavar="N", default=None,
                   help="train only these runs (indices from --list), e.g. one per job of a Slurm array")
    s.add_argument("--skip-invalid", action="store_true", help="leave invalid grid combinations out instead of failing")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    s.add_argument("--backend", default="auto", choices=backend_choices(), help="kernel backend (default: auto)")
    s.add_argument("--compile", action="store_true", help="torch.compile each model")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    pl = sub.add_parser("plot", help="chart the training and validation loss of runs",
                        description="Training and validation loss of one or more run directories against step "
                                    "and against tokens, on one PNG chart; prints its path.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (barkgpt train --out ...)")
    pl.add_argument("--out", default=None, help="PNG to write (default: RUN/loss.png for one run, "
                                                "loss-compare.png for several)")
    pl.add_argument("--title", default=None, help="chart title")
    pl.add_argument("--log-y", action="store_true", help="logarithmic loss axis")


def _cmd_sweep(a) -> int:
    from .sweep import SweepError, load_spec, parse_grid, sweep, sweep_list

    train_settings = {k: v for k, v in (("batch_size", a.batch_size), ("lr", a.lr), ("seed", a.seed),
                                        ("eval_every", a.eval_every)) if v is not None}
    new = a.grid is not None or any(v is not None for v in (a.data, a.preset, a.steps, a.tokens, a.flops)) \
        or train_settings
    if a.list:  # the sweep in --out, or the plan of the one the flags describe (nothing is written)
        spec = None
        if a.spec is not None:
            spec = load_spec(a.spec)
        elif new:
            budgets = {k: v for k, v in (("steps", a.steps), ("tokens", a.tokens), ("flops", a.flops)) if v is not None}
            spec = {"data": a.data or "bark", "preset": a.preset or "bark", "grid": parse_grid(a.grid or []),
                    "budget": budgets, "train": train_settings}
        for run, status in sweep_list(a.out, spec, skip_invalid=a.skip_invalid):
            settings = ", ".join(f"{k}={v}" for k, v in run.settings.items())
            print(f"{run.index:4d}  {status:8s} {run.name}  ({settings}; {run.params:,} params, {run.steps:,} steps, "
                  f"{run.train_flops:.3g} FLOPs)")
        return 0
    kw = dict(only=a.only, skip_invalid=a.skip_invalid, device=a.device,
              backend=None if a.backend == "auto" else a.backend, compile=a.compile, progress=not a.no_progress)
    if a.spec is not None:
        if new:
            raise SweepError("give either --spec or the grid/data/preset/budget flags, not both")
        res = sweep(a.out, spec=load_spec(a.spec), **kw)
    elif new:
        res = sweep(a.out, grid=parse_grid(a.grid) if a.grid else None, data=a.data, preset=a.preset,
                    steps=a.steps, tokens=a.tokens, flops=a.flops, train_settings=train_settings or None, **kw)
    else:
        res = sweep(a.out, **kw)  # continue the sweep in --out
    print(res.files["md"])
    return 0


def _cmd_plot(a) -> int:
    from .plot import plot_runs

    print(plot_runs(a.runs, out=a.out, title=a.title, log_y=a.log_y))
    return 0


def _train_config_from_args(a):
    from .config import GPTConfig
    from .train import TrainConfig

    cfg = TrainConfig(
        preset=a.preset, data=a.data, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, seed=a.seed, device=a.device, backend=None if a.backend == "auto" else a.backend,
        dtype=a.dtype, out=a.out, eval_every=a.eval_every, save_every=a.save_every, keep_last=a.keep_last,
        compile=a.compile, cuda_graph=a.cuda_graph, deterministic=a.deterministic,
        on_nonfinite="skip" if a.skip_nonfinite else "stop",
        progress=not a.no_progress, sample=not a.no_sample, vocab_size=a.vocab_size, val_data=a.val_data,
        val_fraction=a.val_fraction, eval_tokens=a.eval_tokens, eval_batches=a.eval_batches,
        log_every=a.log_every, init_from=a.init_from)
    if a.config:
        cfg.model = GPTConfig.from_json(a.config).to_dict()
    return cfg


class _Unset:
    """The value of a train flag not given on the command line."""


def _without_nproc(argv: List[str]) -> List[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc-per-node":
            skip = True
        elif not x.startswith("--nproc-per-node="):
            out.append(x)
    return out


def _launch(nproc: int, argv: List[str]) -> int:
    """`barkgpt train --nproc-per-node N`: what `torchrun --standalone --nproc_per_node N -m barkgpt
    train` does, in this process, so that Ctrl-C ends in the training processes' one message
    (rank 0's) instead of torchrun's SignalException traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, as torchrun would set
    # torch's launcher logs each signal it forwards and each worker that stops or fails: the
    # workers say it themselves (and a failure is summed up below)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), "--module",
                                         "barkgpt", "train", *argv])
    try:
        run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        code = next((c for c in codes if c not in (0, None)), 1)
        if code == 2:  # a user error, already reported by the failing process in one line
            return 2
        print(f"barkgpt train: a training process failed with exit code {code} (its error is above)",
              file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0


def _explicit_flags(argv=None) -> set:
    """Dest names of the train flags given on the command line ``argv`` (None: sys.argv[1:])."""
    train = build_parser().commands["train"]
    # argparse fills in a default only where the namespace has no value yet: start from one that
    # has a marker for every flag, and what the command line sets replaces it.
    unset = _Unset()
    ns = argparse.Namespace(**dict.fromkeys(vars(train.parse_args([])), unset))
    args = list(sys.argv[1:] if argv is None else argv)
    given = vars(train.parse_args(args[args.index("train") + 1:], namespace=ns))
    return {dest for dest, value in given.items() if value is not unset}


def _cmd_train(a, argv=None) -> int:
    from .train import train

    if a.nproc_per_node and a.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(a.nproc_per_node, _without_nproc(list(sys.argv[2:] if argv is None else argv[1:])))

    cfg = _train_config_from_args(a)
    if a.init_from is not None and "preset" in _explicit_flags(argv):
        raise ValueError("--preset does not apply with --init-from: the model is the one in "
                         f"{a.init_from}; drop --preset")
    if not a.resume:
        train(cfg)
        return 0
    # On --resume only the flags actually given are passed on: the rest come from the checkpoint.
    given = _explicit_flags(argv) - {"resume", "allow_data_change"}
    full = dataclasses.asdict(cfg)
    rename = {"skip_nonfinite": "on_nonfinite", "no_progress": "progress", "no_sample": "sample", "config": "model"}
    overrides = {}
    for dest in given:
        key = rename.get(dest, dest)
        if key in full:
            overrides[key] = full[key]
    train(resume=True, allow_data_change=a.allow_data_change, **overrides)
    return 0


def _load_model(path: str, device, backend: str):
    """A barkgpt run / saved model, or a Hugging Face GPT-2 directory."""
    from .checkpoint import load
    from .hf import is_hf_dir, load_hf

    backend = None if backend == "auto" else backend
    if os.path.isdir(path) and is_hf_dir(path):
        return load_hf(path, device=device, backend=backend)
    return load(path, device=device, backend=backend)


def _sampler(a, device):
    import torch

    gen = torch.Generator(device=device)
    if a.seed is not None:
        gen.manual_seed(a.seed)
    else:
        gen.seed()
    return gen


def _text_model(a):
    """(device, model, tokenizer) for generate and chat: a model that speaks text."""
    from .train import resolve_device

    device = resolve_device(a.device)
    model = _load_model(a.model, device, a.backend)
    if model.tokenizer is None:
        raise ValueError(f"{a.model} has no tokenizer.json; cannot turn text into tokens")
    return device, model, model.tokenizer


def _cmd_generate(a) -> int:
    import torch

    from .stream import TextStream

    device, model, tok = _text_model(a)
    prompt = a.prompt
    if prompt is None:
        prompt = "User: speak Assistant:" if tok.kind == "bark" else "\n"
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenization; give --prompt some text")
    gen = _sampler(a, device)
    idx = torch.tensor([ids] * a.num_samples, device=device)
    sample = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p, greedy=a.greedy,
                  eos_token_id=tok.eos_id, generator=gen)
    if a.num_samples == 1:  # stream: each token printed as soon as it is drawn
        stream = TextStream(tok)
        _write(stream.push(ids))
        try:
            model.generate(idx, a.max_new_tokens, on_token=lambda nxt: _write(stream.push(nxt.tolist())), **sample)
        finally:  # Ctrl-C mid-sample: end the line before the interruption is reported
            _write(stream.flush() + "\n")
        return 0
    out = model.generate(idx, a.max_new_tokens, **sample)
    for row in out.tolist():
        if tok.eos_id is not None and tok.eos_id in row[len(ids):]:
            row = row[:len(ids) + row[len(ids):].index(tok.eos_id) + 1]
        print(tok.decode(row))
    return 0


def _write(text: str) -> None:
    """Print streamed text now (stdout may be a pipe, which Python buffers)."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _read_prompt(interactive: bool) -> Optional[str]:
    """One line of input, None at the end of input or on Ctrl-C at the prompt."""
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
        return line if line else None
    except (EOFError, KeyboardInterrupt):
        return None


def _cmd_chat(a) -> int:
    import torch

    from .data import DataError
    from .stream import TextStream

    device, model, tok = _text_model(a)
    gen = _sampler(a, device)
    interactive = sys.stdin.isatty()
    while True:
        line = _read_prompt(interactive)
        if line is None:
            if interactive:
                _write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if tok.kind == "bark" and not text.startswith("User:"):
            text = f"User: {text} Assistant:"  # the corpus's one exchange per sequence
        try:
            ids = tok.encode(text)
        except DataError as e:  # a word outside the vocabulary: say so, keep chatting
            print(f"barkgpt chat: {e}", file=sys.stderr, flush=True)
            continue
        stream = TextStream(tok)

        def on_token(nxt):
            t = int(nxt[0])
            if t == tok.eos_id:
                return True  # the answer is complete
            _write(stream.push([t]))
            return False

        try:
            model.generate(torch.tensor([ids], device=device), a.max_new_tokens, temperature=a.temperature,
                           top_k=a.top_k or None, top_p=a.top_p, greedy=a.greedy, eos_token_id=tok.eos_id,
                           generator=gen, on_token=on_token)
        except KeyboardInterrupt:  # Ctrl-C during an answer cuts it short; the chat goes on
            pass
        _write(stream.flush() + "\n")


def _cmd_export(a) -> int:
    from .checkpoint import load
    from .hf import save_hf

    model = load(a.model)
    out = save_hf(model, a.out, overwrite=a.force)
    extra = " and tokenizer" if os.path.exists(os.path.join(out, "tokenizer.json")) else ""
    print(f"wrote {out}: GPT-2 config and weights{extra}; load it with "
          f"transformers.GPT2LMHeadModel.from_pretrained({out!r})")
    return 0


def _cmd_tokenize(a) -> int:
    import json

    from .data import tokenize_file

    tokenizer = None
    if a.tokenizer is not None:
        from .hf import tokenizer_from_path

        tokenizer = tokenizer_from_path(a.tokenizer)
    out = tokenize_file(a.input, out=a.out, vocab_size=a.vocab_size, min_frequency=a.min_frequency,
                        overwrite=a.force, progress=not a.no_progress, tokenizer=tokenizer)
    with open(os.path.splitext(out)[0] + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    print(f"wrote {out}: {meta['tokens']:,} tokens ({meta['source_bytes'] / meta['tokens']:.2f} bytes per "
          f"token), vocabulary {meta['vocab_size']}, tokenizer in {os.path.splitext(out)[0]}.json")
    print(f"train on it with: barkgpt train --data {out} --preset small --vocab-size {meta['vocab_size']}")
    return 0


def _eval_size(d) -> str:
    if d.get("eval_tokens") is not None:
        return f"{d['eval_tokens']:,}"
    return f"sized, <= {d['eval_tokens_max']:,}"


def _cmd_presets(_a) -> int:
    from .config import EVAL_SHARE, GPTConfig, train_defaults
    from .model import BarkGPT

    import torch

    rows = []
    for name, about in GPTConfig.presets().items():
        c = GPTConfig.preset(name)
        with torch.device("meta"):
            n = BarkGPT(c, backend="torch").num_params()
        d = train_defaults(name, c)
        rows.append((name, f"{n / 1e6:.3f}M", f"{d['lr']:g}", str(d["batch_size"]),
                     f"5%, <= {d['warmup_max']}", _eval_size(d), about))
    head = ("preset", "params", "lr", "batch", "warmup", "eval tokens", "")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(6)]
    for r in [head] + rows:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r[:6], widths)))
              + ("  " + r[6] if r[6] else ""))
    print(f"\nlr, batch (sequences per micro-step), warmup (of the steps) and eval tokens are what `barkgpt train "
          f"--preset NAME` uses unless --lr, --batch-size, --warmup-steps, --eval-tokens say otherwise; a sized "
          f"evaluation reads about {EVAL_SHARE} x --eval-every x tokens per step (a tenth of the training "
          f"between evaluations).")
    return 0


def _cmd_info(_a) -> int:
    import platform

    import torch

    from . import __version__, ops

    print(f"barkgpt {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    from . import registry

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for b in ops.BACKENDS:
            reason = ops.unavailable_reason(b, dev)
            if reason is not None:
                print(f"{dev:5s} {b:7s} unavailable: {reason}")
                continue
            missing = [op for op in registry.OPS if registry.implementation(op, b) is None]
            print(f"{dev:5s} {b:7s} available" + (f" (lacks {', '.join(missing)})" if missing else ""))
        print(f"{dev:5s} auto -> {ops.resolve_backend(None, dev)}")
    if ops.cpu_gemm_library() is not None:
        print(f"cpu   cpp matrix products: {ops.cpu_gemm_library()} (BARKGPT_CPU_GEMM=auto|onednn|aten)")
        moves = "yes" if ops.cpu_hugepages_enabled() else "no"
        print(f"cpu   generation moves weights to huge pages: {moves} (transparent huge pages: "
              f"{ops.cpu_hugepage_mode() or 'unknown'}; BARKGPT_CPU_HUGEPAGES=0 turns it off)")
    print("ops: " + ", ".join(f"{op} [{', '.join(b for b in ops.BACKENDS if registry.implementation(op, b))}]"
                              for op in registry.OPS))
    return 0


def _one_line(e: BaseException) -> str:
    """The error's message on one line; an OSError as 'what: path' without the errno prefix."""
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
        if e.filename is not None:
            msg += f": {os.fsdecode(e.filename)!r}"
        if e.filename2 is not None:
            msg += f" -> {os.fsdecode(e.filename2)!r}"
    else:
        msg = str(e)
    return " ".join(msg.split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .ops import BackendUnavailable
    from .train import Terminated, TrainingError

    handlers = {"train": lambda a: _cmd_train(a, argv), "generate": _cmd_generate,
                "chat": _cmd_chat, "export": _cmd_export,
                "tokenize": _cmd_tokenize, "presets": _cmd_presets, "info": _cmd_info,
                "sweep": _cmd_sweep, "plot": _cmd_plot}
    debug = os.environ.get("BARKGPT_DEBUG", "0") not in ("", "0")
    try:
        return handlers[a.command](a)
    except BrokenPipeError:
        # stdout closed early (`barkgpt generate ... | head -1`): not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not fail again.
        if debug:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConfigError, DataError, CheckpointError, TrainingError, BackendUnavailable, ValueError,
            IndexError, TypeError, OSError) as e:
        # User errors: one line naming the problem, no traceback from deep inside
        # (BARKGPT_DEBUG=1 shows it). OSError: a path given by the user that is taken, missing,
        # not a directory, unwritable, or a full disk.
        if debug:
            raise
        # Under torchrun an error of rank 0's (a taken --out ...) reaches every rank: say it once.
        if not getattr(e, "reported_by_main", False):
            print(f"barkgpt {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        return 143  # SIGTERM: training already said what it saved, in one line
    except KeyboardInterrupt as e:
        # Training says itself what it saved; under torchrun, rank 0 speaks for the run.
        if not getattr(e, "reported_by_train", False) and os.environ.get("RANK", "0") == "0":
            print("barkgpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
