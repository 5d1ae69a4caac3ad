#!/usr/bin/env bash
# The GPU suite in one command, for a lent GPU machine (no network there: installs nothing from it).
#
#   benchmarks/run_gpu.sh [all|tests|targets|rest|bench|tune|generate|lce]      (default: all)
#
# One call of at most RUN_GPU_BUDGET_S seconds (default 540: a 10-minute device call with room to
# spare; a second try still fits a 15-minute allowance). Phases, most valuable first:
#
# 1. tests: `pytest tests -m gpu` (the correctness tests that need CUDA), at most RUN_GPU_TESTS_S
#    (default 180) seconds, log in gpu-tests.log;
# 2. targets: the benchmark cases issue 20's targets are stated for: attention head dims 64/128 at
#    T = 1k..8k against SDPA flash/cuDNN (and the head dims SDPA refuses), LayerNorm widths
#    8..4096, embedding add, the GPT-2 small training step against torch.compile, the bark
#    presets eager vs CUDA graph (the benchmark's captured step, and `barkgpt.train` itself
#    with and without cuda_graph: steps/s of the whole loop and whether the losses agree,
#    benchmarks/test_bench_train_modes.py); written as gpu-targets.{json,md,png};
# 3. rest: every other benchmark case, as gpu-rest.{json,md,png}.
# Each benchmark phase stops starting cases when its share of the budget is spent, and every
# measurement is appended to gpu-records.jsonl the moment it is taken, so a run that is killed
# keeps what it measured. run.json records the device, versions, command and each phase's exit
# status. `bench` = targets + rest. tune (only when asked): times the attention tile candidates
# (`python -m barkgpt.kernels._attention_config`), log in gpu-attention-tune.log. generate (only
# when asked): decode tokens/s with the KV cache against transformers and the uncached path
# (benchmarks/bench_generate.py). lce (only when asked): the fused linear + cross-entropy's GPU
# tests, then its benchmark group at the full sizes.
#
# Everything lands in $OUT when set (the device tool brings that folder back), else in
# benchmarks/results/. RUN_GPU_DRY=1: the same plumbing on a machine without a GPU (CPU tensors,
# Triton in the interpreter, a few tiny cases per phase): CI runs it (tests/test_run_gpu_script.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
case "$MODE" in all|tests|targets|rest|bench|tune|generate|lce) ;; *) echo "usage: $0 [all|tests|targets|rest|bench|tune|generate|lce]" >&2; exit 2 ;; esac
START=$(date +%s)
BUDGET=${RUN_GPU_BUDGET_S:-540}
TESTS_S=${RUN_GPU_TESTS_S:-180}
DRY=${RUN_GPU_DRY:-0}
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The C++ backend is for CPU tensors: do not spend GPU-machine minutes compiling it.
export BARKGPT_NO_BUILD_EXT=1 BARKGPT_NO_CPP=${BARKGPT_NO_CPP:-1}
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 BARKGPT_BENCH_DEVICE=cpu BARKGPT_BENCH_SIZE=small \
        BARKGPT_BENCH_MEASURE_S=${BARKGPT_BENCH_MEASURE_S:-0.01}
fi

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# run.json: what ran where, rewritten after each phase (so a killed run still has it).
PHASES=""
record_run() {
    $PY - "$DEST/run.json" "$MODE" "$DRY" "$(elapsed)" "$BUDGET" "$PHASES" "$*" <<'EOF'
import json, platform, subprocess, sys
path, mode, dry, elapsed, budget, phases, argv = sys.argv[1:8]
info = {"command": "benchmarks/run_gpu.sh " + mode, "dry_run": dry == "1", "elapsed_s": int(elapsed),
        "budget_s": int(budget), "python": platform.python_version(), "platform": platform.platform()}
info["phases"] = dict(p.split("=", 1) for p in phases.split()) if phases else {}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = f"{p.major}.{p.minor}"
        info["sms"] = p.multi_processor_count
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
except Exception as e:  # noqa: BLE001
    info["torch"] = f"not importable: {e}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    info["triton"] = f"not importable: {e}"
try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
except Exception:  # noqa: BLE001
    pass
with open(path, "w") as f:
    json.dump(info, f, indent=1)
EOF
}

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
record_run
cat "$DEST/run.json"

echo "== install"
if ! (cd /tmp && $PY -c "import barkgpt.kernels" 2>/dev/null); then
    if [ "$DRY" = 1 ] || ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$DEST/gpu-install.log" 2>&1; then
        [ "$DRY" = 1 ] || echo "pip install -e . failed (see gpu-install.log); using a package tree on PYTHONPATH"
        SITE=$(mktemp -d)
        mkdir -p "$SITE/barkgpt"
        for f in "$ROOT"/barkgpt/*; do ln -s "$f" "$SITE/barkgpt/$(basename "$f")"; done
        [ -e "$SITE/barkgpt/kernels" ] || ln -s "$ROOT/kernels" "$SITE/barkgpt/kernels"
        [ -d "$ROOT/csrc" ] && [ ! -e "$SITE/barkgpt/csrc" ] && ln -s "$ROOT/csrc" "$SITE/barkgpt/csrc"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONSAFEPATH=1  # the checkout's barkgpt/ (no kernels/ inside) must not shadow the tree
    fi
fi
(cd /tmp && $PY -c "import barkgpt, barkgpt.ops as o; print('barkgpt', barkgpt.__file__); print('backends on cuda:', o.available_backends('cuda'))") || exit 1

if [ "$MODE" = tune ]; then
    echo "== attention tile tuning (at most $(left)s)"
    (cd /tmp && timeout -s INT -k 15 "$(left)" $PY -m barkgpt.kernels._attention_config) 2>&1 \
        | tee "$DEST/gpu-attention-tune.log"
    rc=${PIPESTATUS[0]}
    PHASES="tune=$rc"; record_run
    exit "$rc"
fi

if [ "$MODE" = generate ]; then
    echo "== generation benchmark (at most $(left)s)"
    timeout -s INT -k 15 "$(left)" $PY benchmarks/bench_generate.py --size full --device cuda \
        --out "$DEST" 2>&1 | tee "$DEST/gpu-generate.log"
    rc=${PIPESTATUS[0]}
    PHASES="generate=$rc"; record_run
    exit "$rc"
fi

if [ "$MODE" = lce ]; then
    echo "== linear_cross_entropy: gpu tests, then its benchmark group"
    timeout -s INT -k 15 "$TESTS_S" $PY -m pytest tests/test_linear_cross_entropy.py -m gpu -q -p no:cacheprovider 2>&1 \
        | tee "$DEST/gpu-lce-tests.log"
    rc=${PIPESTATUS[0]}
    LEFT=$(( $(left) - 30 ))
    BARKGPT_BENCH_SIZE=full BARKGPT_BENCH_OUT="$DEST" BARKGPT_BENCH_BUDGET_S=$LEFT BARKGPT_BENCH_STEM=gpu-lce \
        BARKGPT_BENCH_JSONL="$DEST/gpu-records.jsonl" \
        timeout -s INT -k 15 $(( LEFT + 20 )) $PY -m pytest benchmarks/test_bench_linear_cross_entropy.py -q -s \
        -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name 2>&1 | tee "$DEST/gpu-lce-bench.log"
    rc_b=${PIPESTATUS[0]}
    PHASES="lce-tests=$rc lce-bench=$rc_b"; record_run
    [ "$rc" -eq 0 ] && [ "$rc_b" -eq 0 ]
    exit $?
fi

# ---- selections (pytest -k over the benchmark ids) ----------------------------------------------
ATTN_TARGETS="test_attention and ((xD64-causal or xD128-causal) and not xT256x and (barkgpt-triton or sdpa) and not sdpa-math and not sdpa-efficient or xD1-causal or xD4-causal)"
TRAIN_TARGETS="test_training_step and (gpt2-auto or gpt2-torch or gpt2-compile or bark-tiny or bark-auto or bark-torch or bark-cudagraph)"
TARGETS="test_bench_copy or test_bench_layer_norm or test_bench_embedding or ($ATTN_TARGETS) or ($TRAIN_TARGETS) or test_train_modes"
REST="not ($TARGETS)"
if [ "$DRY" = 1 ]; then  # the CPU's shapes have other ids: a few cheap cases per phase
    TARGETS="test_bench_copy or (test_layer_norm and fwd-eager) or (test_training_step and bark-tiny-torch) or (test_train_modes and bark-tiny)"
    REST="test_embedding_add and B64xT32xV9xC8-fwd-eager"
    GPU_TESTS=tests/test_gpu_readiness.py  # no gpu-marked test there: pytest's "nothing collected" (5)
else
    GPU_TESTS=tests
fi

rc_tests=-
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
    T=$(( TESTS_S < $(left) ? TESTS_S : $(left) ))
    echo "== tests marked gpu (at most ${T}s)"
    timeout -s INT -k 15 "$T" $PY -m pytest "$GPU_TESTS" -m gpu -q -p no:cacheprovider --durations=15 2>&1 \
        | tee "$DEST/gpu-tests.log"
    rc_tests=${PIPESTATUS[0]}
    [ "$rc_tests" -eq 5 ] && rc_tests=0  # nothing collected is not a failure
    echo "tests exit status $rc_tests after $(elapsed)s"
    PHASES="tests=$rc_tests"; record_run
fi

# bench_phase NAME SHARE_PERCENT -k-EXPRESSION: the benchmarks selected, within SHARE% of what is left
# (less 60 s for the case in flight when the budget runs out, a model compile, and the report).
bench_phase() {
    local name=$1 share=$2 expr=$3
    local room=$(( $(left) - 60 ))
    local budget=$(( room * share / 100 ))
    if [ "$budget" -lt 30 ]; then
        echo "== $name: only ${budget}s left, skipped (run '$0 $name' in its own call)" >&2
        PHASES="$PHASES $name=skipped"; record_run
        return 1
    fi
    echo "== benchmarks: $name (budget ${budget}s)"
    BARKGPT_BENCH_SIZE=${BARKGPT_BENCH_SIZE:-full} BARKGPT_BENCH_OUT="$DEST" BARKGPT_BENCH_BUDGET_S=$budget \
        BARKGPT_BENCH_STEM="gpu-$name" BARKGPT_BENCH_JSONL="$DEST/gpu-records.jsonl" \
        timeout -s INT -k 15 $(( budget + 60 )) $PY -m pytest benchmarks/ -q -p no:cacheprovider -k "$expr" \
        --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name 2>&1 | tee "$DEST/gpu-$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 5 ] && rc=0
    echo "$name exit status $rc after $(elapsed)s"
    PHASES="$PHASES $name=$rc"; record_run
    if [ -f "$DEST/gpu-$name.md" ]; then
        echo "== targets (gpu-$name.md)"
        sed -n '/^## Targets/,/^## /p' "$DEST/gpu-$name.md" | head -30
    fi
    return "$rc"
}

rc_bench=0
case "$MODE" in
    all|bench) bench_phase targets 85 "$TARGETS" || rc_bench=1
               bench_phase rest 100 "$REST" || rc_bench=1 ;;
    targets) bench_phase targets 100 "$TARGETS" || rc_bench=1 ;;
    rest) bench_phase rest 100 "$REST" || rc_bench=1 ;;
esac
echo "run finished after $(elapsed)s: tests=$rc_tests benchmarks=$rc_bench; results in $DEST"
[ "$rc_tests" = - ] || [ "$rc_tests" -eq 0 ] || exit 1
exit "$rc_bench"
