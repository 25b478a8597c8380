#!/usr/bin/env bash
# valgrind memcheck on a SmolLM2 decode through ruvpy (tools/valgrind_decode.py): the decode
# runs under memcheck, then the log is sorted and the run fails on any invalid read or write
# (or other memcheck error) whose stack is in ruvpy.
#
#     tools/valgrind_decode.sh [--steps 50] [--kv paged|two-tier|turbo]
#
# PYTHONMALLOC=malloc: Python's objects come from malloc, so memcheck sees their bounds (and
# pymalloc's arena tricks raise no false reports, which would otherwise need CPython's
# suppression file). The log is kept in $VALGRIND_LOG (default: a temporary file, printed).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LOG="${VALGRIND_LOG:-$(mktemp -t ruvpy-valgrind.XXXXXX.log)}"
cd "$ROOT"
# the interpreter itself, not a launcher script (pyenv's shim would be what valgrind traces)
PY="$(python -c 'import sys; print(sys.executable)')"
t0=$(date +%s)
PYTHONMALLOC=malloc valgrind --tool=memcheck --error-limit=no --num-callers=30 \
  --track-origins=no --fullpath-after= --log-file="$LOG" "$PY" tools/valgrind_decode.py "$@"
echo "valgrind ran $(( $(date +%s) - t0 )) s; log: $LOG"
"$PY" tools/valgrind_decode.py --report "$LOG"
