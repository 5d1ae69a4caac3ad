#!/usr/bin/env bash
# The Triton kernels under the Triton versions barkgpt supports, without a GPU:
#
#   benchmarks/check_triton_versions.sh [VERSION ...]      (default: 3.6.0, the GPU machine's)
#
# For each version: a virtual environment (--system-site-packages: the running torch and the
# test tools are reused; torch stays what this machine has) with that Triton, in
# ${BARKGPT_VENV_DIR:-~/.cache/barkgpt/venvs}/triton-VERSION (made once; needs PyPI), then
#   1. the quick compile check (benchmarks/compile_check.py --quick: sm_86 and sm_90),
#   2. the Triton interpreter tests (tests/test_triton_*.py, tests/test_gpu_readiness.py),
# each twice for Triton < 3.7: with numpy < 2.4, and with numpy >= 2.4 (the interpreter clash
# kernels/_compat.py works around; the compile check does not use numpy, so it runs once).
# The installed Triton (the current release) is what the ordinary test suite runs.
# Exit status 1 if anything failed. Run it before a release of the kernels or a change of their
# launch configurations; it takes about 5 minutes per version on 2 idle cores (not in CI: it
# downloads Triton from PyPI).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENVS=${BARKGPT_VENV_DIR:-$HOME/.cache/barkgpt/venvs}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(3.6.0)
TESTS="tests/test_triton_attention.py tests/test_triton_layer_norm.py tests/test_triton_embedding.py tests/test_gpu_readiness.py"
status=0

run_tests() {  # VENV_PYTHON LABEL
    echo "== $2: interpreter tests"
    (cd "$ROOT" && PYTHONPATH="$ROOT" TRITON_INTERPRET=1 "$1" -m pytest $TESTS -q -x -p no:cacheprovider)
    local rc=$?
    [ "$rc" -eq 5 ] && rc=0
    [ "$rc" -eq 0 ] || { echo "FAILED: $2 interpreter tests (exit $rc)"; status=1; }
}

for v in "${VERSIONS[@]}"; do
    venv="$VENVS/triton-$v"
    if [ ! -x "$venv/bin/python" ]; then
        echo "== making $venv"
        mkdir -p "$VENVS"
        "$PY" -m venv --system-site-packages "$venv" || { echo "FAILED: venv for triton $v"; status=1; continue; }
        "$venv/bin/python" -m pip install -q "triton==$v" 'numpy<2.4' || { echo "FAILED: pip install triton==$v"; status=1; continue; }
    fi
    vpy="$venv/bin/python"
    "$vpy" -c "import numpy, torch, triton; print('triton', triton.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"

    echo "== triton $v: compile check (--quick)"
    (cd "$ROOT" && env -u TRITON_INTERPRET PYTHONPATH="$ROOT" "$vpy" benchmarks/compile_check.py --quick \
        --out "benchmarks/results/compile_check-triton$v") || { echo "FAILED: compile check, triton $v"; status=1; }

    run_tests "$vpy" "triton $v, numpy $("$vpy" -c 'import numpy; print(numpy.__version__)')"

    # numpy >= 2.4 with an old interpreter: the second environment differs only in numpy.
    if "$vpy" -c "import sys, triton; sys.exit(0 if tuple(map(int, triton.__version__.split('.')[:2])) < (3, 7) else 1)"; then
        venv2="$VENVS/triton-$v-numpy2.4"
        if [ ! -x "$venv2/bin/python" ]; then
            "$PY" -m venv --system-site-packages "$venv2" && "$venv2/bin/python" -m pip install -q --no-deps "triton==$v" \
                && "$venv2/bin/python" -m pip install -q 'numpy>=2.4' || { echo "FAILED: venv triton $v numpy>=2.4"; status=1; continue; }
        fi
        run_tests "$venv2/bin/python" "triton $v, numpy $("$venv2/bin/python" -c 'import numpy; print(numpy.__version__)')"
    fi
done
[ "$status" -eq 0 ] && echo "all Triton versions passed" || echo "some checks FAILED"
exit "$status"
