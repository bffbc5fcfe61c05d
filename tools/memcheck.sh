#!/usr/bin/env bash
# tools/memcheck.sh - runs tools/memcheck_job.py (train, checkpoint, generate, index, pool) under
# valgrind memcheck against a build of the extension with debug information (-g); exits non-zero on
# any invalid read, invalid write, use of uninitialised memory or bad free inside smallmind's code.
#
#   tools/memcheck.sh
#
# PYTHONMALLOC=malloc sends every Python allocation through malloc, so valgrind sees them (the
# pymalloc arenas would otherwise hide, and falsely flag, reads of small objects). Leak checking
# is off: the interpreter keeps objects alive until exit by design (leaks are measured by
# tests/test_leaks.py and bench/bench_leaks.py). Valgrind's CPU has no AVX-512, so smallmind's
# run-time dispatch picks the AVX2 kernels here; tools/sanitize.sh covers the AVX-512 ones.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${SM_MEMCHECK_DIR:-/tmp/sm-memcheck}
PY=${PYTHON:-python3}
export CFLAGS="-g"
. tools/_build_copy.sh

cd "$WORK/pkg"
LOG="$WORK/memcheck.log"
# The interpreter binary itself: valgrind would otherwise trace a launcher script (pyenv shims).
EXE=$("$PY" -c "import sys; print(sys.executable)")
# The job must finish (its own asserts pass); then every error valgrind reports is sorted by
# tools/memcheck_report.py: the run fails if any stack passes through smallmind's code.
PYTHONMALLOC=malloc PYTHONPATH="$WORK/pkg" valgrind --tool=memcheck --leak-check=no \
    --track-origins=yes --num-callers=40 --log-file="$LOG" "$EXE" tools/memcheck_job.py
echo "valgrind log: $LOG"
"$PY" tools/memcheck_report.py "$LOG"
