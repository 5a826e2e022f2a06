#!/usr/bin/env bash
# On a GPU machine, from the repository root: build the extension, run the whole test suite
# on the GPU and every benchmark, then pack logs and results into $OUT.
#   SUITE_TUNE   attention passes to re-time first (e.g. "fwd_rel dq_rel"; default: none)
#   SUITE_TESTS  pytest arguments (default: tests; "none" skips)
#   SUITE_BENCH  benchmark modules for `python -m benchmarks --only` (default: all; "none" skips)
#   SUITE_WORKERS  pytest-xdist processes for the tests where xdist is installed (default 8;
#                  the whole suite takes about 4 minutes on an H200 with 8)
#   SUITE_TEST_SECONDS / SUITE_BENCH_SECONDS  time limits of the two stages (default 300 / 420);
#                  tests cut short by the limit are listed (started, no result yet)
set -uo pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}
pack() { tar czf "$OUT/results.tar.gz" benchmarks/results; }
trap pack EXIT  # results come back even when a stage is cut short
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
tail -n 3 "$OUT/build.log"

if [ -n "${SUITE_TUNE:-}" ]; then
  python3 -m benchmarks.bench_attention --tune-only --passes $SUITE_TUNE 2>&1 | tee "$OUT/tune.log"
fi

if [ "${SUITE_TESTS:-}" != "none" ]; then
  eval "tests=(${SUITE_TESTS:-tests})"  # keeps quoted pytest arguments such as -k "a or b"
  workers=()
  python3 -c "import xdist" 2>/dev/null && workers=(-n "${SUITE_WORKERS:-8}")
  timeout "${SUITE_TEST_SECONDS:-300}" python3 -m pytest "${tests[@]}" "${workers[@]}" -v \
    -p no:cacheprovider -rfE \
    2>&1 | tee "$OUT/tests.log" | tail -n 40  # -v: a run cut short still names every result
  if [ "${PIPESTATUS[0]}" = 124 ]; then
    # cut short: the tests that had started and had no result yet (with xdist a test's name
    # comes first on a line of its own and its result later after the worker's name; without
    # it, name and result share a line)
    echo "tests cut short by SUITE_TEST_SECONDS; started without a result:"
    awk -v result='^(PASSED|SKIPPED|FAILED|ERROR|XFAIL|XPASS)$' '
      /^tests\// { started[$1] = 1; if ($2 ~ result) done[$1] = 1 }
      { for (i = 1; i < NF; ++i) if ($i ~ result && $(i + 1) ~ /^tests\//) done[$(i + 1)] = 1 }
      END { for (t in started) if (!(t in done)) print "  " t }' "$OUT/tests.log"
  fi
  echo "tests done after $(( $(date +%s) - start )) s"
fi

if [ "${SUITE_BENCH:-}" != "none" ]; then
  timeout "${SUITE_BENCH_SECONDS:-420}" python3 -m benchmarks ${SUITE_BENCH:+--only $SUITE_BENCH} \
    2>&1 | tee "$OUT/bench.log"
  echo "benchmarks done after $(( $(date +%s) - start )) s"
fi
