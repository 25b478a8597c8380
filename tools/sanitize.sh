#!/usr/bin/env bash
# Run ruvpy's tests against an AddressSanitizer + UndefinedBehaviorSanitizer build.
#
#     tools/sanitize.sh [pytest arguments...]      (default: the whole suite, tests/)
#     RUVPY_SANITIZE=address,undefined,float-cast-overflow tools/sanitize.sh tests/test_kvcache.py
#
# What it does:
#   1. copies this checkout (tracked and untracked, not ignored, files) into a temporary
#      directory with its own virtualenv (--system-site-packages: numpy, pytest, ... come from
#      the system; nothing is installed anywhere), so the normal in-place build is untouched;
#   2. builds the extensions there with RUVPY_SANITIZE (setup.py: -fsanitize=..., -O1 -g,
#      -fno-wrapv, recoverable reports);
#   3. runs pytest there with libasan preloaded (Python is not instrumented, the runtime must
#      come first), PYTHONMALLOC=malloc (so Python objects live in ASan's heap, where overflows
#      into them are seen) and every report kept in a log instead of stopping the run;
#   4. sorts the reports (tools/_sanitizer_report.py) and fails on any ASan or UBSan report,
#      or on any leak allocated by ruvpy.
# Leak detection and CPython: CPython does not free its heap at exit (interned strings, types,
# modules, numpy's caches), so LeakSanitizer lists thousands of "leaks" that are Python's by
# design. An LSan suppression matches any frame of a stack, and every allocation has the
# interpreter on its stack, so suppressions cannot tell Python's from ruvpy's. The report
# script therefore counts a leak as ruvpy's when a frame of its stack lies in ruvpy's C sources
# or Cython modules (outside module initialisation, which CPython never undoes): see there.
#
# Environment: KEEP=1 keeps the temporary directory (its path is printed); SANITIZE_TMP=dir
# builds there instead of mktemp (and reuses what is built there); SANITIZE_FULL_STACKS=0 for
# the fast unwinder (see below). Exit status: pytest's if it failed, else 1 on findings.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SANITIZE="${RUVPY_SANITIZE:-address,undefined}"
PYTHON="${PYTHON:-python}"
WORK="${SANITIZE_TMP:-$(mktemp -d -t ruvpy-sanitize.XXXXXX)}"
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi; }
trap cleanup EXIT
t0=$(date +%s)

echo "== sanitized copy ($SANITIZE) in $WORK"
# a kept directory (SANITIZE_TMP) is updated in place: tar keeps the files' times, so only
# what changed is rebuilt
rm -rf "$WORK/logs"
mkdir -p "$WORK/src" "$WORK/logs"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
   xargs -0 tar cf - --ignore-failed-read 2>/dev/null) | (cd "$WORK/src" && tar xf -)
[ -x "$WORK/venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
(cd "$WORK/src" && RUVPY_SANITIZE="$SANITIZE" "$VPY" setup.py build_ext --inplace -j 2 \
   > "$WORK/logs/build.log" 2>&1) || { tail -30 "$WORK/logs/build.log"; exit 2; }
t1=$(date +%s)
echo "   built in $((t1 - t0)) s"

case ",$SANITIZE," in      # the sanitizer runtime that must be loaded before everything else
  *,address,*) PRELOAD="$(gcc -print-file-name=libasan.so)" ;;
  *) PRELOAD="$(gcc -print-file-name=libubsan.so)" ;;
esac

cd "$WORK/src"
# the copy under test is the sanitized one (the working directory comes first on sys.path)
env LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$VPY" -c "
import ruvpy
b = ruvpy.info()['build']
assert b.get('sanitize') == '$SANITIZE', b
assert ruvpy.__file__.startswith('$WORK/src'), ruvpy.__file__"

FAST_UNWIND=0
if [ "${SANITIZE_FULL_STACKS:-1}" = 0 ]; then FAST_UNWIND=1; fi
# Reports go to stderr, which is kept in logs/stderr.log (pytest captures only Python's
# sys.stderr, so C-level reports reach the file). Not log_path: with libasan preloaded, the
# UBSan runtime shares its flags (UBSAN_OPTIONS, parsed last, wins), and the two runtimes
# opened the same log file each, one truncating the other's reports (an injected signed
# overflow went missing that way). For the same reason both variables carry the same common
# flags:
#   keep going after a report (the build recovers); full allocation stacks (CPython has no
#   frame pointers: the fast unwinder stops at its first frame, and a leak of a Python object
#   made by ruvpy would look like Python's own; SANITIZE_FULL_STACKS=0 keeps the fast
#   unwinder, ~9x faster: ruvpy is built with frame pointers, so its own C allocations keep
#   their ruvpy frames, but a Python object ruvpy leaks may pass for Python's); NULL for
#   impossible sizes (ruvpy turns a failed allocation into MemoryError; ASan would abort).
# ASan only: leak detection, no ODR checks (numpy and CPython are not instrumented).
# UBSan only: stack traces.
COMMON="halt_on_error=0:allocator_may_return_null=1:fast_unwind_on_malloc=$FAST_UNWIND"
set +e
env LD_PRELOAD="$PRELOAD" PYTHONMALLOC=malloc \
  ASAN_OPTIONS="$COMMON:detect_leaks=1:detect_odr_violation=0" \
  UBSAN_OPTIONS="$COMMON:print_stacktrace=1" \
  RUVPY_SANITIZED=1 "$VPY" -m pytest -q -p no:cacheprovider --capture=sys "${@:-tests}" \
  2> "$WORK/logs/stderr.log"
status=$?
set -e
if [ $status -ne 0 ]; then tail -40 "$WORK/logs/stderr.log"; fi
t2=$(date +%s)
echo "   tests ran in $((t2 - t1)) s (total $((t2 - t0)) s)"
report=0
"$VPY" "$ROOT/tools/_sanitizer_report.py" "$WORK/logs" "$WORK/src" || report=$?
if [ $status -ne 0 ]; then exit $status; fi
exit $report
