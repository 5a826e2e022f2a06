#!/usr/bin/env bash
# On a GPU machine, from the repository root: build the extension, run the whole test suite
# on the GPU and every benchmark, then pack logs and results into $OUT.
#   SUITE_TESTS  pytest arguments (default: tests)
#   SUITE_BENCH  benchmark modules for `python -m benchmarks --only` (default: all; "none" skips)
set -uo pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?" | tee -a "$OUT/build.log"
tail -n 5 "$OUT/build.log"

eval "tests=(${SUITE_TESTS:-tests})"  # keeps quoted pytest arguments such as -k "a or b"
python3 -m pytest "${tests[@]}" -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 40

if [ "${SUITE_BENCH:-}" != "none" ]; then
  python3 -m benchmarks ${SUITE_BENCH:+--only $SUITE_BENCH} 2>&1 | tee "$OUT/bench.log"
fi
tar czf "$OUT/results.tar.gz" benchmarks/results
