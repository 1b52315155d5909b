#!/usr/bin/env bash
# The test suite on a GPU machine, once, in about 8 minutes at most (an H200: jax with CUDA,
# optax, flax, torch, pytest with xdist and pytest-benchmark; keras need not be there).
#
#   bash .ci/gpu_check.sh          # logs in $OUT if it is set, else in /tmp/rmsjax-gpu-check
#
# 1. the fast suite (-m "not slow"), 8 workers, at most 330 s;
# 2. the slow tests that replay the recorded framework fixtures and the float32 PyTorch recipe
#    (the ones with backend-dependent arithmetic), at most 150 s.
# Each stage's log ends with pytest's summary; summary.txt has one line per stage.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOGS="${OUT:-${TMPDIR:-/tmp}/rmsjax-gpu-check}"
mkdir -p "$LOGS"

python -c "import jax, jaxlib, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
'optax', optax.__version__, jax.default_backend(), jax.devices())" > "$LOGS/versions.txt" 2>&1

stage() {  # name, seconds, pytest arguments...
    local name=$1 seconds=$2
    shift 2
    # -p no:benchmark: pytest-benchmark warns under xdist, and warnings are errors here.
    timeout --kill-after=15 "$seconds" python -m pytest -p no:benchmark -p no:cacheprovider -n 8 \
        -q -ra "$@" > "$LOGS/$name.log" 2>&1
    echo "$name: exit $? ($(tail -n 1 "$LOGS/$name.log"))" >> "$LOGS/summary.txt"
}

stage fast 330 -m "not slow"
stage slow 150 -m slow tests/test_recipes.py tests/test_keras_recipes.py tests/test_compat.py \
    tests/test_benchmarks.py::test_one_pass_step_with_multi_output_fusion
cat "$LOGS/versions.txt" "$LOGS/summary.txt"
