"""Sort the sanitizer logs of one tools/sanitize.sh run and decide whether ruvpy is clean.

    python tools/_sanitizer_report.py LOG_DIR SOURCE_DIR

LOG_DIR holds the run's stderr.log (and any asan.* / ubsan.* files of a log_path).
Prints the counts and every finding that is ruvpy's; exits 1 if there is one.

- An AddressSanitizer error (heap-buffer-overflow, use-after-free, ...) counts whatever code it
  is in: only ruvpy's extensions are instrumented, and an error seen in an interceptor (memcpy
  called by numpy, ...) may still be ruvpy's pointer.
- A UBSan "runtime error" is always ruvpy's: no other code is built with UBSan.
- A LeakSanitizer leak counts as ruvpy's when a frame of its allocation stack is in ruvpy's
  sources (csrc/*.c, or the Cython-generated ruvpy/_*.c) other than module initialisation.
  Not counted, because they are CPython's and numpy's by design (neither frees its heap at
  exit): leaks with no ruvpy frame, and leaks made while a ruvpy module was being imported
  (its module object, interned strings, cached constants and types live as long as the
  interpreter, which never unloads an extension module).
"""
import json
import os
import re
import sys

FRAME = re.compile(r"^\s*#\d+ 0x[0-9a-f]+ in (?P<func>\S+) (?P<where>.*)$")
# Cython module initialisation: objects made here live until the interpreter exits.
MODULE_INIT = re.compile(r"PyInit_|__pyx_pymod_exec|__Pyx_InitConstants|__Pyx_InitCachedConstants"
                         r"|__Pyx_CreateStringTab|__Pyx_InitGlobals|__Pyx_modinit_|__Pyx_ImportType"
                         r"|__Pyx_InitCachedBuiltins|__Pyx_StringTabInit")


def _is_ruvpy_frame(func, where, source_dir):
    return source_dir in where or "/ruvpy/csrc/" in where


def _blocks(text):
    """Paragraphs of a sanitizer log (reports and leak records are separated by blank lines)."""
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def classify_leak(block, source_dir):
    frames = [m.groupdict() for m in map(FRAME.match, block.splitlines()) if m]
    ours = [f for f in frames if _is_ruvpy_frame(f["func"], f["where"], source_dir)]
    if not ours:
        return "python"          # CPython / numpy: no ruvpy frame on the allocation stack
    if any(MODULE_INIT.search(f["func"]) for f in frames):
        return "import"          # made while importing a ruvpy module: lives with the interpreter
    return "ruvpy"


def main(log_dir, source_dir):
    counts = {"asan_errors": 0, "ubsan_errors": 0, "leaks_ruvpy": 0, "leaks_import": 0,
              "leaks_python": 0, "log_files": 0}
    findings = []
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith(("asan.", "ubsan.", "stderr")):
            continue
        counts["log_files"] += 1
        with open(os.path.join(log_dir, name), errors="replace") as f:
            text = f.read()
        # every file is read for every kind of report (one process writes them all)
        for block in _blocks(text):
            if "ERROR: AddressSanitizer" in block:
                counts["asan_errors"] += 1
                findings.append(block)
            elif "runtime error:" in block:
                counts["ubsan_errors"] += len(re.findall(r"runtime error:", block))
                findings.append(block)
            elif re.match(r"\s*(Direct|Indirect) leak of", block):
                kind = classify_leak(block, source_dir)
                counts["leaks_" + kind] += 1
                if kind == "ruvpy":
                    findings.append(block)
    for block in findings:
        print(block.strip()[:4000], end="\n\n")
    print("sanitizer report:", json.dumps(counts))
    clean = not (counts["asan_errors"] or counts["ubsan_errors"] or counts["leaks_ruvpy"])
    print("ruvpy is clean" if clean else "FINDINGS in ruvpy (above)")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
