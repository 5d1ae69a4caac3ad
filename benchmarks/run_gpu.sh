#!/usr/bin/env bash
# The GPU suite in one command, for a lent GPU machine (no network there: installs nothing from it).
#
#   benchmarks/run_gpu.sh [all|tests|bench|tune|generate|lce]      (default: all)
#
# 1. makes barkgpt importable: `pip install --no-deps --no-build-isolation --no-index -e .`,
#    else a throw-away package tree on PYTHONPATH (kernels/ mapped to barkgpt.kernels);
# 2. tests: `pytest tests -m gpu` (the correctness tests that need CUDA), log in gpu-tests.log;
# 3. bench: `pytest benchmarks/` with BARKGPT_BENCH_SIZE=full, bf16, results written as
#    <kind>-full.{json,md,png} (e.g. h100-full.*) plus gpu-bench.log;
# lce (only when asked): just the fused linear + cross-entropy: its gpu tests, then its benchmark
#    group (GPT-2 head at N = 4096 / 8192, time and memory against eager and torch.compile);
# tune (only when asked): times the attention tile candidates on this GPU
#    (`python -m barkgpt.kernels._attention_config`) and leaves the table lines to paste into
#    kernels/_attention_config.py in gpu-attention-tune.log.
# generate (only when asked): generation with the KV cache against transformers and the uncached
#    path at GPT-2 small's shape (benchmarks/bench_generate.py --size full, fp32), results in
#    generate-cuda-full.{json,md} plus gpu-generate.log (about 2 minutes on an H100-class GPU).
# Everything lands in $OUT when set (the device tool brings that folder back), else in
# benchmarks/out/ (git ignores it; copy curated results into benchmarks/results/). The whole run
# fits RUN_GPU_BUDGET_S seconds (default 540, for a 10-minute device call): the tests get at most RUN_GPU_TESTS_S, and the benchmarks stop starting
# new cases when their share is spent (BARKGPT_BENCH_BUDGET_S), keeping what they measured.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
case "$MODE" in all|tests|bench|tune|generate|lce) ;; *) echo "usage: $0 [all|tests|bench|tune|generate|lce]" >&2; exit 2 ;; esac
START=$(date +%s)
BUDGET=${RUN_GPU_BUDGET_S:-540}
TESTS_S=${RUN_GPU_TESTS_S:-180}
DEST=${OUT:-$ROOT/benchmarks/out}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The C++ backend is for CPU tensors: do not spend GPU-machine minutes compiling it.
export BARKGPT_NO_BUILD_EXT=1 BARKGPT_NO_CPP=${BARKGPT_NO_CPP:-1}

elapsed() { echo $(( $(date +%s) - START )); }

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
$PY - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "sms", p.multi_processor_count, "L2 MiB", p.L2_cache_size >> 20)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF

echo "== install"
if ! (cd /tmp && $PY -c "import barkgpt.kernels" 2>/dev/null); then
    if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$DEST/gpu-install.log" 2>&1; then
        echo "pip install -e . failed (see gpu-install.log); using a package tree on PYTHONPATH"
        SITE=$(mktemp -d)
        mkdir -p "$SITE/barkgpt"
        for f in "$ROOT"/barkgpt/*; do ln -s "$f" "$SITE/barkgpt/$(basename "$f")"; done
        ln -s "$ROOT/kernels" "$SITE/barkgpt/kernels"
        [ -d "$ROOT/csrc" ] && [ ! -e "$SITE/barkgpt/csrc" ] && ln -s "$ROOT/csrc" "$SITE/barkgpt/csrc"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONSAFEPATH=1  # the checkout's barkgpt/ (no kernels/ inside) must not shadow the tree
    fi
fi
(cd /tmp && $PY -c "import barkgpt, barkgpt.ops as o; print('barkgpt', barkgpt.__file__); print('backends on cuda:', o.available_backends('cuda'))") || exit 1

if [ "$MODE" = tune ]; then
    echo "== attention tile tuning (at most $(( BUDGET - $(elapsed) ))s)"
    (cd /tmp && timeout -s INT -k 15 $(( BUDGET - $(elapsed) )) $PY -m barkgpt.kernels._attention_config) 2>&1 \
        | tee "$DEST/gpu-attention-tune.log"
    exit "${PIPESTATUS[0]}"
fi

if [ "$MODE" = generate ]; then
    echo "== generation benchmark (at most $(( BUDGET - $(elapsed) ))s)"
    timeout -s INT -k 15 $(( BUDGET - $(elapsed) )) $PY benchmarks/bench_generate.py --size full --device cuda \
        --out "$DEST" 2>&1 | tee "$DEST/gpu-generate.log"
    exit "${PIPESTATUS[0]}"
fi
if [ "$MODE" = lce ]; then
    echo "== linear_cross_entropy: gpu tests, then its benchmark group"
    timeout -s INT -k 15 "$TESTS_S" $PY -m pytest tests/test_linear_cross_entropy.py -m gpu -q -p no:cacheprovider 2>&1 \
        | tee "$DEST/gpu-lce-tests.log"
    rc=${PIPESTATUS[0]}
    LEFT=$(( BUDGET - $(elapsed) - 30 ))
    BARKGPT_BENCH_SIZE=full BARKGPT_BENCH_OUT="$DEST" BARKGPT_BENCH_BUDGET_S=$LEFT \
        timeout -s INT -k 15 $(( LEFT + 20 )) $PY -m pytest benchmarks/test_bench_linear_cross_entropy.py -q -s \
        -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-sort=name 2>&1 | tee "$DEST/gpu-lce-bench.log"
    rc_b=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] && [ "$rc_b" -eq 0 ]
    exit $?
fi

rc_tests=0
if [ "$MODE" != bench ]; then
    echo "== tests marked gpu (at most ${TESTS_S}s)"
    timeout -s INT -k 15 "$TESTS_S" $PY -m pytest tests -m gpu -q -p no:cacheprovider --durations=15 2>&1 \
        | tee "$DEST/gpu-tests.log"
    rc_tests=${PIPESTATUS[0]}
    echo "tests exit status $rc_tests after $(elapsed)s"
fi

rc_bench=0
if [ "$MODE" != tests ]; then
    # Leave room for the case in flight when the budget runs out (a model compile) and the report.
    LEFT=$(( BUDGET - $(elapsed) - 75 ))
    if [ "$LEFT" -lt 60 ]; then
        echo "only ${LEFT}s left for the benchmarks: run '$0 bench' in its own call" >&2
        exit 1
    fi
    echo "== benchmarks (budget ${LEFT}s)"
    BARKGPT_BENCH_SIZE=${BARKGPT_BENCH_SIZE:-full} BARKGPT_BENCH_OUT="$DEST" BARKGPT_BENCH_BUDGET_S=$LEFT \
        timeout -s INT -k 15 $(( LEFT + 60 )) $PY -m pytest benchmarks/ -q -p no:cacheprovider \
        --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name 2>&1 | tee "$DEST/gpu-bench.log"
    rc_bench=${PIPESTATUS[0]}
    echo "benchmarks exit status $rc_bench after $(elapsed)s"
    MD=$(ls -t "$DEST"/*-full*.md 2>/dev/null | head -1)
    if [ -n "$MD" ]; then
        echo "== targets ($MD)"
        sed -n '/^## Targets/,/^## /p' "$MD" | head -30
    fi
fi
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
