#!/usr/bin/env bash
# Device check for rmsjax.quantized (issue 20): run from the repository root on the GPU machine,
#   bash benchmarks/gpu_quantized_check.sh            (writes into $OUT if set, else /tmp/quantized_gpu)
# 1. the low-bit tests on the GPU backend, including the peak-memory acceptance test that is
#    xfail on XLA:CPU and asserted elsewhere (~2 min);
# 2. the train-step benchmark in GPU mode: 16384 x 16384 and 20M leaves, float32 / 8-bit / 4-bit,
#    plus the compile-time peak-memory table (~3 min), then again with --second-trace (~3 min).
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-/tmp/quantized_gpu}"
mkdir -p "$OUT"
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/device.txt"
timeout 240 python -m pytest -p no:benchmark -q -p no:cacheprovider tests/test_codec.py tests/test_quantized.py \
  -k "peak or acceptance or non_finite or bound_replaces or float16 or declared or nnx or centred" \
  2>&1 | tail -40 | tee "$OUT/tests.txt"
timeout 300 python benchmarks/bench_quantized.py --gpu --trials 7 --steps 5 --out "$OUT" 2>&1 | tail -40
# 3. the same with 0.3.0's second trace of the new state, side by side (is it what the GPU paid for?)
timeout 300 python benchmarks/bench_quantized.py --gpu --second-trace --trials 7 --steps 5 --out "$OUT" 2>&1 | tail -25
