#!/usr/bin/env bash
# tools/sanitize.sh - builds smallmind's extension with AddressSanitizer + UndefinedBehaviorSanitizer
# into a scratch folder and runs the test suite (or the given pytest arguments) against it.
#
#   tools/sanitize.sh                      # the whole suite
#   tools/sanitize.sh tests/test_gemm.py   # any pytest arguments
#
# CPython itself is not instrumented, so the ASan runtime is preloaded into the interpreter.
# Any report stops the run with a non-zero status (halt_on_error for both sanitizers); leak
# detection is off because the interpreter keeps many objects alive until exit by design (leaks are
# measured separately: tests/test_leaks.py and bench/bench_leaks.py). The build keeps setup.py's
# -O3 (the code under test is the code that ships) and adds -g, so reports carry line numbers; it
# never touches the in-place build of the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${SM_SANITIZE_DIR:-/tmp/sm-sanitize}
PY=${PYTHON:-python3}

SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
export CFLAGS="-g $SAN"
export LDFLAGS="$SAN"
. tools/_build_copy.sh

ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
cd "$WORK/pkg"
# detect_leaks=0: see above. halt_on_error / abort_on_error: the first report fails the run.
# allocator_may_return_null=1: tests that ask for absurd sizes get NULL (-> MemoryError), as
# without ASan, instead of ASan aborting on the request.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:detect_stack_use_after_return=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# Tests whose bounds ASan itself would break (RSS growth: its quarantine holds freed memory) read this.
export SMALLMIND_UNDER_SANITIZER=1
if [ $# -eq 0 ]; then set -- tests -q -p no:cacheprovider; fi
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" PYTHONPATH="$WORK/pkg" "$PY" -m pytest "$@"
