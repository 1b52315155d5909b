#!/usr/bin/env bash
# One prepared run on a GPU machine (an H100 or H200: jax with CUDA, optax, flax, torch, pytest
# with xdist and pytest-benchmark; keras need not be there), in under 10 minutes:
#
#   bash .ci/gpu_check.sh                # every stage; logs in $OUT if set, else /tmp/rmsjax-gpu-check
#   bash .ci/gpu_check.sh fast bench     # only the stages named
#
# fast   the fast suite (-m "not slow"), 8 workers, at most 240 s (issue 19: the suite passes on
#        a GPU as on CPU; the low-bit peak acceptance test reports XPASS or XFAIL there);
# slow   the slow tests that replay the recorded framework fixtures and the float32 PyTorch
#        recipe (the ones with backend-dependent arithmetic), at most 110 s;
# bench  benchmarks/bench_quantized.py --gpu (issue 20): the donated train step with float32,
#        8-bit and 4-bit state on 16384 x 16384 and 20M leaves, and the compile-time peak table
#        of six optimizers, at most 170 s; its tables land in $OUT.
# With the version check (at most 60 s), the whole run stays under 600 s.
# Each stage's log ends with its summary; summary.txt has one line per stage.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOGS="${OUT:-${TMPDIR:-/tmp}/rmsjax-gpu-check}"
mkdir -p "$LOGS"
: > "$LOGS/summary.txt"
STAGES="${*:-fast slow bench}"
for name in $STAGES; do
    case $name in
        fast | slow | bench) ;;
        *) echo "unknown stage $name (fast, slow, bench)" >&2; exit 2 ;;
    esac
done

timeout 60 python -c "import jax, jaxlib, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
'optax', optax.__version__, jax.default_backend(), jax.devices())" > "$LOGS/versions.txt" 2>&1

stage() {  # name, seconds, pytest arguments...
    local name=$1 seconds=$2
    shift 2
    # -p no:benchmark: pytest-benchmark warns under xdist, and warnings are errors here.
    timeout --kill-after=5 "$seconds" python -m pytest -p no:benchmark -p no:cacheprovider -n 8 \
        -q -ra "$@" > "$LOGS/$name.log" 2>&1
    echo "$name: exit $? ($(tail -n 1 "$LOGS/$name.log"))" >> "$LOGS/summary.txt"
}

for name in $STAGES; do
    case $name in
        fast) stage fast 240 -m "not slow" ;;
        slow) stage slow 110 -m slow tests/test_recipes.py tests/test_keras_recipes.py tests/test_compat.py \
                  tests/test_benchmarks.py::test_one_pass_step_with_multi_output_fusion ;;
        bench) timeout --kill-after=5 170 python benchmarks/bench_quantized.py --gpu --trials 5 --steps 5 \
                   --out "$LOGS" > "$LOGS/bench.log" 2>&1
               echo "bench: exit $? (tables in $LOGS/bench_quantized_gpu.md)" >> "$LOGS/summary.txt" ;;
    esac
done
cat "$LOGS/versions.txt" "$LOGS/summary.txt"
