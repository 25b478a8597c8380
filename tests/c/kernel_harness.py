"""Reference vectors and build logic for the C kernel-table check (kernel_check.c).

One set of float64 numpy references (written once per test session as a case file) checks the
kernel table of every ISA: the x86 ones compiled natively, NEON cross-compiled with
aarch64-linux-gnu-gcc and run under qemu-aarch64. test_kernels.py reuses the fp16 edge cases.

Adding a kernel: write its runner in kernel_check.c (see the comment there), then a
`cases_<name>(rng)` generator here yielding `(label, arrays)`; `write_cases` picks it up by name.
"""
import ast
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE.parent) not in sys.path:      # tests/: turbo_format.py
    sys.path.insert(0, str(HERE.parent))
CSRC = ROOT / "ruvpy" / "csrc"
KERNELS = CSRC / "kernels"

F32_EPS = float(np.finfo(np.float32).eps)
FLT_MIN = float(np.finfo(np.float32).tiny)
# covers empty input, scalar-only, exactly one vector, vector + every tail length, unrolled loops
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 66, 127, 128, 129,
           255, 1000, 4099]


# ---------------------------------------------------------------- what the build uses

# What tools/sanitize.sh sets for the sanitized Python must not reach the programs this harness
# starts: LeakSanitizer preloaded into gcc would report the compiler's by-design leaks on stderr
# and turn its exit status into 23, and qemu would hand an x86-64 libasan to the program it
# runs. Under a sanitized ruvpy build the native checks are built with the same sanitizers
# (linked with their runtimes, no preload needed) and stop at the first report, which fails
# the test through their exit status.
SANITIZER_VARIABLES = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "PYTHONMALLOC")
CHECK_SANITIZER_OPTIONS = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1",
                           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


def child_env():
    """The environment of every program the harness runs: this process's, without a
    sanitized run's preload and options (and, for a sanitized build, with the checks'
    halt-on-first-report options)."""
    env = {k: v for k, v in os.environ.items() if k not in SANITIZER_VARIABLES}
    if build_sanitizers():
        env.update(CHECK_SANITIZER_OPTIONS)
    return env


def _setup_literal(name):
    """A literal assigned at the top of setup.py (so the harness compiles like the build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"setup.py has no literal {name}")


ISA_FLAGS = _setup_literal("ISA_FLAGS")


def base_cflags(sanitize=True):
    """The C flags setup.py built ruvpy with (recorded in ruvpy/_build_info.py); without its
    -fsanitize flags when sanitize is false."""
    from ruvpy._build_info import BUILD_INFO
    return [f for f in BUILD_INFO["cflags"] if sanitize or not f.startswith("-fsanitize")]


def build_sanitizers():
    """The -fsanitize= list ruvpy was built with (RUVPY_SANITIZE), or None."""
    from ruvpy._build_info import BUILD_INFO
    return BUILD_INFO.get("sanitize")


def rv_ops_fields():
    """Names of the kernel slots of struct rv_ops, in order, from rv_ops.h."""
    text = (KERNELS / "rv_ops.h").read_text()
    body = re.search(r"typedef struct rv_ops \{(.*?)\} rv_ops;", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return re.findall(r"\(\s*\*\s*(\w+)\s*\)\s*\(", body)


RV_ATTN_CHUNK = int(re.search(r"#define RV_ATTN_CHUNK (\d+)", (KERNELS / "rv_ops.h").read_text()).group(1))


# ---------------------------------------------------------------- building and running

class Target:
    """A way to build and run a C check program of tests/c (kernel_check by default): a
    compiler, the ISAs linked in, a run prefix, and the baseline sources of ruvpy/csrc the
    program needs besides the kernel table (paths relative to csrc)."""

    def __init__(self, name, cc, isas, link_flags=(), run_prefix=(), program="kernel_check", sources=(),
                 cflags=(), sanitize=False):
        self.name, self.cc, self.isas = name, cc, list(isas)
        self.program, self.sources, self.cflags = program, list(sources), list(cflags)
        # sanitize: built with the sanitizers ruvpy was built with (base_cflags), and linked
        # with their runtimes
        self.sanitize = bool(sanitize and build_sanitizers())
        self.link_flags, self.run_prefix = list(link_flags), list(run_prefix)
        if self.sanitize:
            self.link_flags.append("-fsanitize=" + build_sanitizers())
        # build directories: kernel_check's keep their old names
        self.label = name if program == "kernel_check" else f"{program}-{name}"
        if self.sanitize:
            self.label += "-sanitized"

    def for_program(self, program, sources, cflags=()):
        """The same compiler, ISAs and run prefix, building tests/c/<program>.c with `sources`
        (and `cflags` on every object besides setup.py's)."""
        link_flags = [f for f in self.link_flags if not f.startswith("-fsanitize")]
        return Target(self.name, self.cc, self.isas, link_flags, self.run_prefix, program, sources, cflags,
                      self.sanitize)

    def available(self):
        return shutil.which(self.cc) is not None and all(shutil.which(p) for p in self.run_prefix[:1])

    def _compiles(self):
        """(source, compile command without its output) for each object of the program."""
        defines = [f"-DRUVPY_BUILD_{isa.upper()}=1" for isa in self.isas]
        sources = [(HERE / f"{self.program}.c", []), (KERNELS / "rv_dispatch.c", [])]
        sources += [(CSRC / src, []) for src in self.sources]
        sources += [(KERNELS / f"ops_{isa}.c", ISA_FLAGS[isa]) for isa in self.isas]
        return [(src, [self.cc, *base_cflags(self.sanitize), *self.cflags, *flags, *defines, f"-I{CSRC}", "-c", str(src)])
                for src, flags in sources]

    def build_key(self):
        """Hash of everything the binary depends on: compiler, commands, and the sources and
        headers each object includes (as the compiler's -MM lists them)."""
        h = hashlib.sha256()
        version = subprocess.run([self.cc, "--version"], capture_output=True, text=True,
                                 env=child_env()).stdout
        h.update(f"{self.label}|{shutil.which(self.cc)}|{version}|{self.link_flags}".encode())
        deps = set()
        for _, cmd in self._compiles():
            h.update(repr(cmd).encode())
            proc = subprocess.run([*cmd[:-2], "-MM", cmd[-1]], capture_output=True, text=True, check=True,
                                  env=child_env())
            deps.update(proc.stdout.replace("\\\n", " ").split(":", 1)[1].split())
        for path in sorted(deps):
            h.update(path.encode() + Path(path).read_bytes())
        return h.hexdigest()[:20]

    def build(self, cache_root, pool):
        """Builds the program under cache_root, or reuses the build of identical sources and
        flags (a build of every ISA's kernels takes a minute on a busy machine). Objects compile
        in parallel on `pool` (a concurrent.futures executor), kernel files with their ISA's
        flags. Returns a future of (binary, {source name: compiler stderr}) for warning checks."""
        cache_root = Path(cache_root)
        cache_root.mkdir(parents=True, exist_ok=True)
        final = cache_root / f"{self.label}-{self.build_key()}"
        if (final / "diagnostics.json").exists():
            os.utime(final)     # recently used: kept by _prune
            done = concurrent.futures.Future()
            cached = json.loads((final / "diagnostics.json").read_text())
            done.set_result((final / self.program, {src: _warnings(text) for src, text in cached.items()}))
            return done
        work = Path(tempfile.mkdtemp(dir=cache_root, prefix=f"{self.label}-building-"))
        compiles = [(src, [*cmd, "-o", str(work / f"{src.parent.name}_{src.stem}.o")]) for src, cmd in self._compiles()]
        futures = [pool.submit(subprocess.run, cmd, capture_output=True, text=True, env=child_env())
                   for _, cmd in compiles]
        return pool.submit(self._link, work, final, compiles, futures)

    def _link(self, work, final, compiles, futures):
        diagnostics = {}
        for (src, cmd), future in zip(compiles, futures):
            proc = future.result()
            if proc.returncode:
                raise RuntimeError(f"{self.name}: compiling {src.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
            diagnostics[src.name] = _warnings(proc.stderr)
        cmd = [self.cc, *(cmd[-1] for _, cmd in compiles), "-o", str(work / self.program), *self.link_flags, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if proc.returncode:
            raise RuntimeError(f"{self.name}: linking failed:\n{' '.join(cmd)}\n{proc.stderr}")
        (work / "diagnostics.json").write_text(json.dumps(diagnostics))
        try:
            work.rename(final)
        except OSError:         # a concurrent session finished the same build first
            shutil.rmtree(work, ignore_errors=True)
        _prune(final.parent, self.label)
        return final / self.program, diagnostics

    def run(self, binary, cases, isa, prefix=None):
        cmd = [*(self.run_prefix if prefix is None else prefix), str(binary), str(cases), isa]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
        return CheckResult(isa, proc)


def _prune(cache_root, name, keep=4):
    """Drops all but the newest `keep` builds of a target."""
    builds = sorted(cache_root.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        if "-building-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)


def build_targets(targets, cache_root):
    """{target name: (target, binary, diagnostics)} for every target, built concurrently."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2) + len(targets)) as pool:
        futures = {t.name: (t, t.build(cache_root, pool)) for t in targets}
        return {name: (t, *future.result()) for name, (t, future) in futures.items()}


class CheckResult:
    """Parsed output of one kernel_check run."""

    def __init__(self, isa, proc):
        self.isa, self.returncode, self.stdout, self.stderr = isa, proc.returncode, proc.stdout, proc.stderr
        self.unsupported = proc.returncode == 77
        lines = proc.stdout.splitlines()
        head = re.match(r"table (\w+) lanes (\d+) slots (\d+) best (\w+)", lines[0]) if lines else None
        self.table, self.lanes, self.slots, self.best = (
            (head.group(1), int(head.group(2)), int(head.group(3)), head.group(4)) if head else (None,) * 4)
        if self.unsupported and lines:
            self.best = re.search(r"best here: (\w+)", lines[0]).group(1)
        self.passed = [ln[5:] for ln in lines if ln.startswith("PASS ")]
        self.failed = [ln[5:] for ln in lines if ln.startswith("FAIL ")]
        self.null_slots = [int(ln.split()[-1]) for ln in lines if ln.startswith("NULL slot")]
        self.untested_slots = [int(ln.split()[-1]) for ln in lines if ln.startswith("UNTESTED slot")]

    def problems(self, case_names):
        """Everything wrong with this run, as text ('' if it passed every case of case_names,
        the list write_cases returned)."""
        out = []
        names = rv_ops_fields()
        out += [f"table slot {names[s] if s < len(names) else s} is NULL" for s in self.null_slots]
        out += [f"FAIL {f}" for f in self.failed[:40]]
        done = len(self.passed) + len(self.failed)
        if self.returncode not in (0, 1) or done != len(case_names):
            crashed = case_names[done] if done < len(case_names) else "after the last case"
            out.append(f"exit code {self.returncode} after {done} of {len(case_names)} cases: "
                       f"crashed in {crashed!r}; stderr: {self.stderr[-1000:]}")
        return "\n".join(out)


def native_target(sanitize=True):
    """This machine's ISAs, compiled with the compiler Python's extensions use (as setup.py),
    with ruvpy's sanitizers if it was built with them (sanitize=False: without; what runs
    under qemu-x86_64, where AddressSanitizer cannot map its shadow memory)."""
    from ruvpy._build_info import BUILD_INFO
    sanitize = bool(sanitize and build_sanitizers())
    return Target("native", (sysconfig.get_config_var("CC") or "cc").split()[0], BUILD_INFO["isas"],
                  sanitize=sanitize)


def aarch64_target():
    """NEON: cross-compiled static binary under user-mode qemu."""
    return Target("aarch64", "aarch64-linux-gnu-gcc", ["scalar", "neon"], link_flags=["-static"],
                  run_prefix=["qemu-aarch64"])


def runner_names(binary, target):
    proc = subprocess.run([*target.run_prefix, str(binary), "--runners"], capture_output=True,
                          text=True, check=True, timeout=60, env=child_env())
    return proc.stdout.split()


# ---------------------------------------------------------------- case file

_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.uint16): 1, np.dtype(np.int32): 2,
                np.dtype(np.float64): 3, np.dtype(np.uint8): 4}


def _str(s):
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def encode_case(kernel, label, arrays):
    """One case in kernel_check.c's format. arrays: key -> ndarray, or a number (a parameter).
    Native byte order: the file is read on little-endian machines only (x86-64, aarch64)."""
    assert sys.byteorder == "little"
    parts = [b"RVKC", _str(kernel), _str(label), struct.pack("<I", len(arrays))]
    for key, value in arrays.items():
        a = np.asarray(value, dtype=np.float64).reshape(1) if np.isscalar(value) else np.asarray(value)
        if a.dtype == np.float16:
            a = a.view(np.uint16)
        a = np.ascontiguousarray(a.reshape(-1))
        parts += [_str(key), struct.pack("<IQ", _DTYPE_CODES[a.dtype], a.size), a.tobytes()]
    return b"".join(parts)


def write_cases(path, seed=20240611):
    """Writes every kernel's cases; returns their "kernel label" names in file order."""
    names = []
    with open(path, "wb") as f:
        for kernel in rv_ops_fields():
            gen = globals().get("cases_" + kernel)
            if gen is None:
                continue    # reported by the coverage test, not here
            rng = np.random.default_rng([seed, len(kernel)])
            for label, arrays in gen(rng):
                f.write(encode_case(kernel, label, arrays))
                names.append(f"{kernel} {label}")
    return names


# ---------------------------------------------------------------- references: basic kernels

def _warnings(stderr):
    """A compiler's stderr if it warns, else "": notes alone do not count (at -g, the sanitized
    build, gcc notes that the turbo kernels exceed its variable-tracking limit: debug info)."""
    return stderr if "warning:" in stderr else ""


def _tol(values):
    return np.asarray(values, dtype=np.float64)


def cases_dot_f32(rng):
    for n in LENGTHS:
        # small integers: every partial sum is exact in float32, so any order gives the same
        a = rng.integers(-8, 9, n).astype(np.float32)
        b = rng.integers(-8, 9, n).astype(np.float32)
        yield f"int n={n}", {"a": a, "b": b, "exact:r": np.float32([np.dot(a.astype(np.float64), b)])}
        a = rng.standard_normal(n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        yield f"normal n={n}", {"a": a, "b": b, **expect_dot(a, b)}
    for n in (5, 37, 130):
        a = np.ones(n, np.float32)
        a[-1] = np.inf
        yield f"inf at the tail n={n}", {"a": a, "b": np.ones(n, np.float32), "exact:r": np.float32([np.inf])}


def expect_dot(a, b):
    """Expected dot product and a tolerance for float32 accumulation (rounding errors grow
    like sqrt(n); 2 sqrt(n) + 2 units is well above that, well below a missed element)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    n = a.size
    return {"expect:r": _tol([a64 @ b64]), "tol:r": _tol([(2 * np.sqrt(n) + 2) * F32_EPS * (np.abs(a64 * b64).sum()) + 1e-30])}


def expect_axpy(alpha, x, y):
    """alpha x + y; a fused or an unfused multiply-add rounds at most twice."""
    ax = np.float64(np.float32(alpha)) * x.astype(np.float64)
    return {"expect:y": ax + y, "tol:y": F32_EPS * (np.abs(ax) + np.abs(y)) + 1e-45}


def cases_axpy_f32(rng):
    for n in LENGTHS:
        x = rng.integers(-100, 100, n).astype(np.float32)
        y = rng.integers(-100, 100, n).astype(np.float32)
        yield f"int n={n}", {"x": x, "y": y, "alpha": -3.0, "exact:y": (np.float32(-3) * x + y).astype(np.float32)}
        x = rng.standard_normal(n).astype(np.float32)
        y = rng.standard_normal(n).astype(np.float32)
        alpha = float(np.float32(rng.standard_normal()))
        yield f"normal n={n}", {"x": x, "y": y, "alpha": alpha, **expect_axpy(alpha, x, y)}


def cases_scale_f32(rng):
    # one rounded multiply: bit-exact with numpy's float32 product, subnormals and overflow too
    for n in LENGTHS:
        with np.errstate(over="ignore"):
            x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 39, n)).astype(np.float32)
            alpha = float(np.float32(rng.uniform(-3, 3)))
            yield f"n={n}", {"x": x, "alpha": alpha, "exact:x": np.float32(alpha) * x}


def cases_max_f32(rng):
    for n in LENGTHS:
        if n == 0:
            yield "empty", {"x": np.zeros(0, np.float32), "exact:r": np.float32([-np.inf])}
            continue
        for where in sorted({0, n // 2, n - 1}):   # the maximum first, inside, in the tail
            x = rng.uniform(-1e6, 0.0, n).astype(np.float32)
            x[where] = 3.5
            yield f"max at {where} n={n}", {"x": x, "exact:r": np.float32([3.5])}
    for n in (1, 9, 70):
        yield f"all -inf n={n}", {"x": np.full(n, -np.inf, np.float32), "exact:r": np.float32([-np.inf])}
        x = np.full(n, -np.inf, np.float32)
        x[-1] = np.inf
        yield f"+inf last n={n}", {"x": x, "exact:r": np.float32([np.inf])}


def expect_exp(x, shift):
    """exp(x - shift) with the difference rounded to float32 as the kernel forms it; ~2 ulp,
    anything below FLT_MIN may flush to 0 (documented in rv_simd.h)."""
    d = (x.astype(np.float32) - np.float32(shift)).astype(np.float64)
    with np.errstate(over="ignore"):
        e = np.exp(d)
    e[e > np.finfo(np.float32).max] = np.inf
    return e, 3e-7 * np.where(np.isfinite(e), e, 0.0) + FLT_MIN


def expect_sum_exp(x, shift, out_key):
    e, tol = expect_exp(x, shift)
    total = e.sum()
    finite_sum = e[np.isfinite(e)].sum()
    sum_tol = (3e-7 + (x.size + 4) * F32_EPS) * finite_sum + x.size * FLT_MIN
    # the kernel sums in float32: a total beyond FLT_MAX by more than the rounding bound must
    # come out inf, one within the bound of FLT_MAX may come out either way
    flt_max = float(np.finfo(np.float32).max)
    if total - sum_tol > flt_max:
        total = np.inf
    elif total + sum_tol > flt_max:
        sum_tol = np.inf
    arrays = {"expect:sum": _tol([total]), "tol:sum": _tol([sum_tol])}
    if out_key:
        arrays[f"expect:{out_key}"], arrays[f"tol:{out_key}"] = e, tol
    return arrays


def cases_sum_exp_f32(rng):
    for n in LENGTHS:
        x = (rng.standard_normal(n) * 8).astype(np.float32)
        shift = float(x.max()) if n else 0.0
        for mode, out_key in ((0, "out"), (1, None), (2, "x")):
            yield f"softmax-like mode={mode} n={n}", {"x": x, "shift": shift, "mode": mode,
                                                      **expect_sum_exp(x, shift, out_key)}
        yield f"zeros n={n}", {"x": np.zeros(n, np.float32), "shift": 0.0, "mode": 0,
                               "exact:sum": np.float32([n]), "exact:out": np.ones(n, np.float32)}
    # the whole range: underflow to 0 (and -inf), overflow to inf, NaN kept
    x = np.concatenate([np.linspace(-110, 89.5, 4001), [-np.inf, -1e30, -88.0, -87.0, 88.7, 88.76, 1e30, np.inf]])
    x = rng.permutation(x).astype(np.float32)
    yield "full range", {"x": x, "shift": 0.0, "mode": 0, **expect_sum_exp(x, 0.0, "out")}
    x = rng.uniform(-200, -90, 77).astype(np.float32)
    x[::5] = -np.inf
    yield "underflow", {"x": x, "shift": 0.0, "mode": 0, **expect_sum_exp(x, 0.0, "out")}
    x = rng.uniform(-3, 3, 45).astype(np.float32)
    x[[3, 40]] = np.nan
    yield "nan", {"x": x, "shift": 0.5, "mode": 0, **expect_sum_exp(x, 0.5, "out")}


# ---------------------------------------------------------------- references: fp16

def all_halves():
    """Every one of the 65,536 binary16 bit patterns (NaN payloads, sNaN, inf, subnormals, -0)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def fp16_edge_floats():
    """float32 values at every rounding decision of float32 -> float16: the exact midpoint of
    every pair of adjacent finite halves (ties to even at every exponent, subnormals included)
    and the float32 neighbours of each, the overflow boundary (65504 / 65520), the smallest
    subnormals (2^-24, the 2^-25 tie), float32 subnormals, signed zeros, infinities, NaNs."""
    h = np.arange(0x7c00, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)                  # exact: 12 significant bits
    bits = mid.view(np.uint32)
    near = np.concatenate([bits, bits - 1, bits + 1]).view(np.float32)
    special = np.float32([
        65504, 65519.996, 65520, np.nextafter(np.float32(65520), np.float32(np.inf)), 65536, 1e5, 3.4e38,
        2.0 ** -24, 2.0 ** -25, np.nextafter(np.float32(2.0 ** -25), np.float32(0)),
        np.nextafter(np.float32(2.0 ** -25), np.float32(1)), 3 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25,
        2.0 ** -26, 1e-45, 1e-40, 1.1754942e-38, 0.0, np.inf, 1.0, 0.5, 2048, 2049, 4097])
    nans = np.uint32([0x7fc00000, 0x7f800001, 0x7fa00000, 0x7fbfffff, 0x7f802000, 0x7f801fff,
                      0x7fffffff, 0x7fc00001]).view(np.float32)
    both = np.concatenate([near, special, nans])
    return np.concatenate([both, -both])


def cases_f32_to_f16(rng):
    yield "all halves", _f32_to_f16_case(all_halves().astype(np.float32))
    yield "edges", _f32_to_f16_case(fp16_edge_floats())
    yield "random bits", _f32_to_f16_case(rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32))
    for n in LENGTHS:
        x = rng.standard_normal(n).astype(np.float32) * 1000
        if n:
            x[-1] = np.float32(np.uint32(0x7fa00001).view(np.float32))   # a signalling NaN in the tail
        yield f"n={n}", _f32_to_f16_case(x)


def _f32_to_f16_case(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return {"x": x, "exact:h": x.astype(np.float16).view(np.uint16)}


def cases_f16_to_f32(rng):
    h = all_halves()
    yield "all halves", {"h": h, "exact:x": h.astype(np.float32)}
    for n in LENGTHS:
        h = rng.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16).view(np.float16)
        yield f"n={n}", {"h": h, "exact:x": h.astype(np.float32)}


# ---------------------------------------------------------------- references: attention

def attention_reference(q, k, v, visible):
    """Float64 softmax attention of each query row over the first visible[r] keys.
    Returns (out [rows, d], lse [rows]); a row that sees no key gives zeros and -inf."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    rows, d = q.shape
    out, lse = np.zeros((rows, d)), np.full(rows, -np.inf)
    for r in range(rows):
        n = visible[r]
        if n <= 0:
            continue
        s = k[:n] @ q[r]
        m = s.max()
        p = np.exp(s - m)
        lse[r] = m + np.log(p.sum())
        out[r] = (p / p.sum()) @ v[:n]
    return out, lse


def attention_tolerance(q, k, v, visible):
    """Per-element tolerances for float32 attention: score errors of dot products (grow with
    sqrt(d) and sum |q_i k_i|), exp (~2 ulp), float32 sums over the keys."""
    q, k, v = (np.abs(a.astype(np.float64)) for a in (q, k, v))
    rows, d = q.shape
    tol_out, tol_lse = np.zeros((rows, d)), np.zeros(rows)
    for r in range(rows):
        n = visible[r]
        if n <= 0:
            continue
        s_abs = (k[:n] @ q[r]).max()
        weight_err = (np.sqrt(d) + 2) * F32_EPS * s_abs + 4e-7
        sum_err = (2 * np.sqrt(n) + 2) * F32_EPS
        tol_out[r] = (2 * weight_err + sum_err) * v[:n].max() + 1e-30
        tol_lse[r] = 2 * weight_err + sum_err + 4 * F32_EPS * s_abs
    return tol_out, tol_lse


class AttentionProblem:
    """Query rows and a logical key/value sequence with float64 expectations, laid out in
    memory like a KV cache: token rows at a stride (other heads' columns in between) and, for
    "blocks", 16-token blocks stored out of order as a span list. Everything the kernel must
    not read (stride gaps, rows between blocks, query row gaps) holds NaN, so reading it shows."""

    def __init__(self, rng, rows, d, T, visible_kind, kv_dtype, *, q_scale=1.0, trend=0.0,
                 layout="one", scale=1.0):
        self.rows, self.d, self.T, self.kv_dtype = rows, d, T, kv_dtype
        q = rng.standard_normal((rows, d)) * q_scale / np.sqrt(d) / scale
        self.q = q.astype(np.float32)
        k = rng.standard_normal((T, d))
        k += trend * np.arange(T)[:, None] * self.q[:1].astype(np.float64) / max(np.abs(self.q[0]).sum(), 1e-9)
        self.k, self.v = k.astype(kv_dtype), rng.standard_normal((T, d)).astype(kv_dtype)
        if visible_kind == "all":
            self.visible = None
        elif visible_kind == "causal":          # query r sits at position T - rows + r
            self.visible = np.clip(T - rows + 1 + np.arange(rows), 0, T).astype(np.int32)
        else:
            self.visible = rng.integers(0, T + 1, rows).astype(np.int32)
            self.visible[0], self.visible[-1] = 0, T
        self.q_stride, self.k_stride, self.v_stride = d + 3, 3 * d + 1, 2 * d
        self._layout(rng, layout)
        q_scaled = self.q.astype(np.float64) * np.float32(scale)
        visible = np.full(rows, T) if self.visible is None else self.visible
        self.out, self.lse = attention_reference(q_scaled, self.k, self.v, visible)
        self.tol_out, self.tol_lse = attention_tolerance(q_scaled, self.k, self.v, visible)

    def _layout(self, rng, layout):
        T = self.T
        if layout == "one":
            lens = [T]
        else:                                   # blocks, a partial last one, empty spans
            lens = [16] * (T // 16) + ([T % 16] if T % 16 else [])
            for at in sorted(rng.integers(0, len(lens) + 1, 2), reverse=True):
                lens.insert(at, 0)
        lens = np.array(lens, np.int32)
        starts = np.zeros(lens.size, np.int32)
        row = 0
        for i in (rng.permutation(lens.size) if layout != "one" else [0]):
            starts[i] = row
            row += lens[i] + (layout != "one")  # one unused row between stored blocks
        logical = np.concatenate([[0], np.cumsum(lens)])
        self.span_starts, self.span_lens = starts, lens
        nan = np.array(np.nan, self.kv_dtype)
        k_rows = np.full((max(row, 1), self.k_stride), nan, self.kv_dtype)
        v_rows = np.full((max(row, 1), self.v_stride), nan, self.kv_dtype)
        for i in range(lens.size):
            k_rows[starts[i]:starts[i] + lens[i], :self.d] = self.k[logical[i]:logical[i + 1]]
            v_rows[starts[i]:starts[i] + lens[i], :self.d] = self.v[logical[i]:logical[i + 1]]
        last = max(row - (layout != "one"), 1)  # the arrays end with the last stored element
        self.k_store = k_rows.reshape(-1)[:(last - 1) * self.k_stride + self.d]
        self.v_store = v_rows.reshape(-1)[:(last - 1) * self.v_stride + self.d]

    def q_store(self):
        q = np.full((self.rows, self.q_stride), np.nan, np.float32)
        q[:, :self.d] = self.q
        return q.reshape(-1)[:(self.rows - 1) * self.q_stride + self.d]

    def arrays(self, **params):
        """The case arrays common to every attention runner."""
        out = {"rows": self.rows, "head_dim": self.d, "q_stride": self.q_stride,
               "k_stride": self.k_stride, "v_stride": self.v_stride, "q": self.q_store(),
               "k": self.k_store, "v": self.v_store, **params}
        if self.visible is not None:
            out["visible"] = self.visible
        return out

    def state_expectations(self):
        return {"expect:out": self.out, "tol:out": self.tol_out, "expect:lse": self.lse, "tol:lse": self.tol_lse}


ATTENTION_SHAPES = [  # (rows, head_dim, T, chunk, visible)
    (1, 1, 1, RV_ATTN_CHUNK, "all"), (1, 3, 70, RV_ATTN_CHUNK, "all"), (3, 4, 64, RV_ATTN_CHUNK, "causal"),
    (8, 7, 65, 17, "random"), (2, 8, 129, RV_ATTN_CHUNK, "all"), (5, 16, 200, RV_ATTN_CHUNK, "causal"),
    (4, 17, 33, 1, "random"), (1, 33, 150, 64, "all"), (6, 64, 100, RV_ATTN_CHUNK, "causal"),
    (3, 64, 257, 31, "random"), (7, 100, 90, RV_ATTN_CHUNK, "all"), (2, 128, 300, RV_ATTN_CHUNK, "causal"),
    (9, 3, 5, RV_ATTN_CHUNK, "causal"), (4, 256, 80, 40, "random"), (1, 255, 64, RV_ATTN_CHUNK, "all"),
]


def _attention_problems(rng, kv_dtype, layout="one"):
    """(label, chunk, problem) over ATTENTION_SHAPES, plus large score ranges and a maximum
    that grows / shrinks along the keys (the running max and the rescaling then matter)."""
    for rows, d, T, chunk, vis in ATTENTION_SHAPES:
        yield f"rows={rows} d={d} T={T} chunk={chunk} {vis}", chunk, AttentionProblem(rng, rows, d, T, vis, kv_dtype, layout=layout)
    for trend in (0.5, -0.5):
        yield f"trend={trend}", RV_ATTN_CHUNK, AttentionProblem(rng, 3, 24, 190, "causal", kv_dtype, q_scale=4.0,
                                                                trend=trend, layout=layout)
    yield "sharp", RV_ATTN_CHUNK, AttentionProblem(rng, 4, 32, 130, "all", kv_dtype, q_scale=30.0, layout=layout)


def _chunk_cases(rng, kv_dtype):
    # the runner feeds the keys in chunks and clips the "visible" counts to each chunk
    for label, chunk, p in _attention_problems(rng, kv_dtype):
        yield label, p.arrays(T=p.T, chunk=chunk, **p.state_expectations())


def cases_attend_chunk_f32(rng):
    return _chunk_cases(rng, np.float32)


def cases_attend_chunk_f16(rng):
    return _chunk_cases(rng, np.float16)


def _spans_cases(rng, kv_dtype):
    for layout in ("one", "blocks"):
        for label, _, p in _attention_problems(rng, kv_dtype, layout):
            yield f"{layout} {label}", p.arrays(span_starts=p.span_starts, span_lens=p.span_lens, **p.state_expectations())


def cases_attend_spans_f32(rng):
    return _spans_cases(rng, np.float32)


def cases_attend_spans_f16(rng):
    return _spans_cases(rng, np.float16)


ROWS_SHAPES = [  # (rows, head_dim, T, visible): decode-sized to full prefill tiles
    (1, 64, 100, "all"), (5, 7, 33, "causal"), (16, 64, 200, "causal"), (64, 64, 64, "causal"),
    (64, 17, 130, "random"), (33, 128, 70, "causal"), (3, 256, 90, "random"), (8, 1, 10, "causal"),
    (12, 3, 5, "causal"), (20, 16, 300, "all"), (7, 100, 65, "random"), (2, 4, 1, "all"),
]


def _rows_cases(rng, kv_dtype):
    for i, (rows, d, T, vis) in enumerate(ROWS_SHAPES + [(4, 24, 190, "causal"), (6, 32, 130, "all")]):
        extra = {"q_scale": 4.0, "trend": 0.5} if i == len(ROWS_SHAPES) else {"q_scale": 30.0} if i > len(ROWS_SHAPES) else {}
        scale = float(np.float32(1 / np.sqrt(d)))
        p = AttentionProblem(rng, rows, d, T, vis, kv_dtype, layout="blocks" if i % 2 else "one", scale=scale, **extra)
        in_place, want_ml = i % 3 == 1, i % 4 != 3
        out_stride = p.q_stride if in_place else d + 5 * (i % 2)
        out = np.full((rows, out_stride), 7.25, np.float32)        # the gaps must keep this
        if in_place:
            out[:, :d] = p.q
        want = out.astype(np.float64)
        want[:, :d] = p.out
        tol = np.zeros_like(want)
        tol[:, :d] = p.tol_out
        n = (rows - 1) * out_stride + d
        arrays = p.arrays(scale=scale, span_starts=p.span_starts, span_lens=p.span_lens, out_stride=out_stride,
                          in_place=int(in_place), want_ml=int(want_ml), out=out.reshape(-1)[:n],
                          **{"expect:out": want.reshape(-1)[:n], "tol:out": tol.reshape(-1)[:n]})
        if want_ml:
            arrays.update({"expect:lse": p.lse, "tol:lse": p.tol_lse})
        yield f"rows={rows} d={d} T={T} {vis}{' in place' if in_place else ''}{' +m,l' if want_ml else ''}", arrays


def cases_attend_rows_f32(rng):
    return _rows_cases(rng, np.float32)


def cases_attend_rows_f16(rng):
    return _rows_cases(rng, np.float16)


HEADS_SHAPES = [  # (heads, rows, head_dim, keys, visible, dense token rows)
    (1, 1, 64, 100, "all", True), (3, 4, 64, 200, "causal", False), (2, 3, 7, 65, "random", False),
    (4, 1, 128, 300, "all", True), (3, 2, 17, 33, "causal", True), (9, 1, 1, 5, "all", False),
    (2, 8, 100, 130, "random", True),
]


def _heads_cases(rng, kv_dtype):
    """Several KV heads of token-major ("NHD") storage: dense (heads fill the token's row) or
    with gaps between heads and tokens (NaN, never to be read); the tokens in one span, or in
    blocks of 16 stored in a random order with an unused row between them (a paged cache's)."""
    for (heads, rows, d, n, vis, dense), layout in [(shape, layout) for shape in HEADS_SHAPES
                                                    for layout in ("one", "blocks")]:
        k_head = d if dense else d + 1
        k_tok = heads * k_head + (0 if dense else 2)
        v_head, v_tok = (d, heads * d) if dense else (d + 2, heads * (d + 2) + 1)
        q_stride = d + 3
        q = (rng.standard_normal((heads, rows, d)) / np.sqrt(d)).astype(np.float32)
        k = rng.standard_normal((n, heads, d)).astype(kv_dtype)
        v = rng.standard_normal((n, heads, d)).astype(kv_dtype)
        visible = {"all": None, "causal": np.clip(n - rows + 1 + np.arange(rows), 0, n),
                   "random": np.r_[0, rng.integers(0, n + 1, rows - 1)][:rows]}[vis]
        q_store = np.full((heads * rows, q_stride), np.nan, np.float32)
        q_store[:, :d] = q.reshape(heads * rows, d)
        lens = [n] if layout == "one" else [16] * (n // 16) + ([n % 16] if n % 16 else [])
        starts, row = [0] * len(lens), 0
        for i in (range(len(lens)) if layout == "one" else rng.permutation(len(lens))):
            starts[i] = row
            row += lens[i] + (layout != "one")       # one unused row between stored blocks
        logical = np.concatenate([[0], np.cumsum(lens)]).astype(int)
        stored_rows = max(starts[i] + lens[i] for i in range(len(lens)))
        stores = []
        for data, tok, head in ((k, k_tok, k_head), (v, v_tok, v_head)):
            store = np.full(stored_rows * tok, np.nan, kv_dtype)
            for i in range(len(lens)):
                for h in range(heads):
                    store.reshape(stored_rows, tok)[starts[i]:starts[i] + lens[i], h * head:h * head + d] = \
                        data[logical[i]:logical[i + 1], h]
            stores.append(store[:(stored_rows - 1) * tok + (heads - 1) * head + d])
        seen = np.full(rows, n) if visible is None else visible
        refs = [attention_reference(q[h], k[:, h], v[:, h], seen) for h in range(heads)]
        tols = [attention_tolerance(q[h], k[:, h], v[:, h], seen) for h in range(heads)]
        arrays = {"rows": rows, "head_dim": d, "num_heads": heads, "n": n, "q_stride": q_stride,
                  "k_tok": k_tok, "k_head": k_head, "v_tok": v_tok, "v_head": v_head,
                  "span_starts": np.array(starts, np.int32), "span_lens": np.array(lens, np.int32),
                  "q": q_store.reshape(-1)[:(heads * rows - 1) * q_stride + d], "k": stores[0], "v": stores[1],
                  "expect:out": np.concatenate([r[0] for r in refs]), "tol:out": np.concatenate([t[0] for t in tols]),
                  "expect:lse": np.concatenate([r[1] for r in refs]), "tol:lse": np.concatenate([t[1] for t in tols])}
        if visible is not None:
            arrays["visible"] = visible.astype(np.int32)
        yield f"heads={heads} rows={rows} d={d} n={n} {vis}{' dense' if dense else ''} {layout}", arrays


def cases_attend_heads_f32(rng):
    return _heads_cases(rng, np.float32)


def cases_attend_heads_f16(rng):
    return _heads_cases(rng, np.float16)


# ---------------------------------------------------------------- references: KV quantization

QUANT_DIMS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65, 128]


def quant_rows(rng, n, d, bits, row_bytes):
    """n rows of random codes in the cold-store layout (8-bit: a byte per channel; 4-bit:
    byte j = channel j | channel j + ceil(d/2) << 4), padding bytes and the unused high nibble
    of an odd d filled with junk. Returns (bytes trimmed after the last row's code, codes [n, d])."""
    codes = rng.integers(0, 256 if bits == 8 else 16, (n, d))
    rows = np.full((n, row_bytes), 0xA5, np.uint8)
    if bits == 8:
        width = d
        rows[:, :d] = codes
    else:
        width = (d + 1) // 2
        high = np.full((n, width), 15)
        high[:, :d - width] = codes[:, width:]
        rows[:, :width] = codes[:, :width] | high << 4
    return rows.reshape(-1)[:(n - 1) * row_bytes + width], codes


def _expect_affine(codes, scale, zero):
    """scale * code + zero; a fused or unfused multiply-add rounds at most twice."""
    prod = codes * scale
    return {"expect:out": (prod + zero).reshape(-1), "tol:out": (F32_EPS * (np.abs(prod) + np.abs(zero))).reshape(-1) + 1e-45}


def cases_dequant_rows_channel(rng):
    for bits in (8, 4):
        for d in QUANT_DIMS:
            n, width = 3, d if bits == 8 else (d + 1) // 2
            row_bytes = width + (d % 3) * 5
            data, codes = quant_rows(rng, n, d, bits, row_bytes)
            scale = rng.uniform(1e-3, 0.1, d).astype(np.float32)
            zero = rng.standard_normal(d).astype(np.float32)
            yield f"bits={bits} d={d}", {"n": n, "head_dim": d, "bits": bits, "row_bytes": row_bytes,
                                         "codes": data, "scale": scale, "zero": zero,
                                         **_expect_affine(codes, scale.astype(np.float64), zero.astype(np.float64))}


def cases_dequant_rows_group(rng):
    for bits in (8, 4):
        for d, group in [(d, g) for d in QUANT_DIMS for g in (32, 7)] + [(64, 64), (16, 1), (130, 16)]:
            n, width = 3, d if bits == 8 else (d + 1) // 2
            row_bytes = width + (d % 2) * 3
            data, codes = quant_rows(rng, n, d, bits, row_bytes)
            groups = -(-d // group)
            stride = groups + (d % 3)
            scale = np.full((n, stride), np.nan, np.float16)   # gaps between tokens: never read
            zero = np.full((n, stride), np.nan, np.float16)
            scale[:, :groups] = rng.uniform(1e-3, 0.1, (n, groups))
            zero[:, :groups] = rng.standard_normal((n, groups))
            per_channel = np.arange(d) // group
            s64 = scale[:, per_channel].astype(np.float64)
            z64 = zero[:, per_channel].astype(np.float64)
            used = (n - 1) * stride + groups
            yield f"bits={bits} d={d} group={group}", {
                "n": n, "head_dim": d, "bits": bits, "group": group, "row_bytes": row_bytes,
                "param_stride": stride, "codes": data, "scale": scale.reshape(-1)[:used],
                "zero": zero.reshape(-1)[:used], **_expect_affine(codes, s64, z64)}


def _group_visible(rng, kind, rows, n):
    """(the case's "visible" array or None, the counts the reference uses) for rows over n
    tokens: all, causal (row r is query token n - rows + r), or random with 0 and n present."""
    if kind == "all":
        return None, np.full(rows, n)
    if kind == "causal":
        visible = np.clip(n - rows + 1 + np.arange(rows), 0, n).astype(np.int32)
    else:
        visible = rng.integers(0, n + 1, rows).astype(np.int32)
        visible[0], visible[-1] = 0, n
    return visible, visible


QGROUP_SHAPES = [  # (bits, head_dim, G, group_size, rows, key outliers, value outliers, a, n, visible)
    (4, 128, 64, 32, 4, 2, 1, 0, 64, "all"), (4, 64, 64, 32, 3, 0, 0, 10, 40, "causal"),
    (8, 64, 32, 32, 4, 0, 0, 0, 32, "all"), (8, 40, 48, 8, 7, 0, 0, 5, 43, "causal"),
    (4, 40, 16, 16, 6, 1, 2, 3, 13, "random"), (4, 17, 33, 7, 5, 1, 1, 0, 33, "random"),
    (8, 3, 5, 2, 1, 0, 0, 1, 4, "all"), (4, 256, 64, 64, 9, 8, 8, 0, 64, "causal"),
    (4, 1, 2, 1, 2, 1, 0, 1, 1, "all"),
    # an odd head_dim whose keys take the int8 path (G 64) with outlier rows right after it
    (4, 33, 64, 16, 3, 2, 1, 0, 64, "all"), (4, 63, 64, 32, 3, 4, 2, 0, 64, "causal"),
    # groups past one chunk of the integer value path's four 16-token blocks (QK_VFOLD): a
    # start inside the group's second block, the last chunk short of four blocks and cut
    # mid-block
    (4, 64, 128, 32, 3, 2, 1, 20, 100, "causal"), (4, 128, 80, 64, 4, 0, 3, 0, 80, "random"),
    (4, 64, 96, 16, 2, 1, 0, 5, 85, "all"),
]


def cases_attend_qgroup(rng):
    """A quantized group head in the cold-store layout (keys channel-major, values token-major,
    junk in padding bytes) against float64 attention over what its codes decode to."""
    for bits, d, G, gs, rows, nk, nv, a, n, vis_kind in QGROUP_SHAPES:
        levels = 255 if bits == 8 else 15
        krow = (G if bits == 8 else (G + 1) // 2) + 3
        vrow = (d if bits == 8 else (d + 1) // 2) + 1
        kbytes, kc = quant_rows(rng, d + nk, G, bits, krow)            # kc [d + nk][G]
        vbytes, vc = quant_rows(rng, G, d, bits, vrow)                 # vc [G][d]
        # the scales and zeros are binary16, as the format stores them (the kernel reads them
        # in place); float32 copies of the same values for the reference
        kscale = rng.uniform(1e-3, 1.5 / levels, d).astype(np.float16).astype(np.float32)
        kzero = (rng.standard_normal(d) * 0.5).astype(np.float16).astype(np.float32)
        ng = -(-d // gs)
        vscale = rng.uniform(1e-3, 1.5 / levels, (G, ng)).astype(np.float16).astype(np.float32)
        vzero = (rng.standard_normal((G, ng)) * 0.5).astype(np.float16).astype(np.float32)
        kidx = np.sort(rng.choice(d, nk, replace=False)).astype(np.uint8)
        vidx = np.sort(rng.choice(d, nv, replace=False)).astype(np.uint8)
        voscale = rng.uniform(1e-3, 0.02, nv).astype(np.float32)
        vozero = (rng.standard_normal(nv) * 5.0).astype(np.float32)
        ks64, kz64 = kscale.astype(np.float64), kzero.astype(np.float64)
        kcode = kc[:d].T.astype(np.float64)                            # [G][d]
        kcode[:, kidx] += 16 * kc[d:].T                                # outliers: 8-bit codes
        k_prod = kcode * ks64
        keys, keys_abs = k_prod + kz64, np.abs(k_prod) + np.abs(kz64)
        per_channel = np.arange(d) // gs
        v_prod = vc * vscale[:, per_channel].astype(np.float64)
        vz64 = vzero[:, per_channel].astype(np.float64)
        values, values_abs = v_prod + vz64, np.abs(v_prod) + np.abs(vz64)
        # an outlier channel's value is an 8-bit code of its own per-channel parameters, in a
        # row of the G tokens per outlier (vocodes); its slot in the token rows holds junk here
        # (the format writes 0) that must not count
        vos64, voz64 = voscale.astype(np.float64), vozero.astype(np.float64)
        vocodes, o_codes = quant_rows(rng, nv, G, 8, G)                # o_codes [nv][G]
        o_code = o_codes.T.astype(np.float64)
        values[:, vidx] = o_code * vos64 + voz64
        values_abs[:, vidx] = np.abs(o_code * vos64) + np.abs(voz64)
        q = (rng.standard_normal((rows, d)) * 2.0 / np.sqrt(d)).astype(np.float32)
        visible, vis = _group_visible(rng, vis_kind, rows, n)
        if bits == 4:
            # 4-bit keys score with int8 weights per 16 channels (quant_impl.h): the reference
            # scores the codes with exactly those weights, q_aug = [w(q * scale), q] against
            # k_aug = [codes (and the outliers' high nibbles), zero]
            from _helpers import q4_int8_weights, q4_value_weight_error
            w = np.stack([q4_int8_weights(np.concatenate([q[r] * kscale, np.float32(16.0) * (q[r] * kscale)[kidx]]), d)
                          for r in range(rows)]).astype(np.float64)
            q_aug = np.concatenate([w, q.astype(np.float64)], 1)
            k_aug = np.concatenate([kc[:d].T, kc[d:].T, np.broadcast_to(kzero.astype(np.float64), (G, d))], 1)
            out, lse = attention_reference(q_aug, k_aug[a:a + n], np.pad(values, ((0, 0), (0, nk + d)))[a:a + n], vis)
            out = out[:, :d]
            tol_out, tol_lse = attention_tolerance(q_aug, np.abs(k_aug[a:a + n]),
                                                   np.pad(values_abs, ((0, 0), (0, nk + d)))[a:a + n], vis)
            tol_out = tol_out[:, :d]
            if d % 64 == 0 and gs % 16 == 0 and -(-d // gs) <= 8:
                # avx512vnni and avx2 sum these values with 8-bit weights (quant_impl.h qk_values_int,
                # tests/_helpers.py q4_value_weight_error); outlier value channels are replaced
                # by float sums (qk_outlier_values): no bound there
                inexact = np.ones(d)
                inexact[vidx] = 0.0
                for r in range(rows):
                    if vis[r] <= 0:
                        continue
                    s = k_aug[a:a + vis[r]] @ q_aug[r]
                    p = np.exp(s - s.max())
                    err = q4_value_weight_error(p, vscale, a, a + vis[r])
                    tol_out[r] += inexact * (1.01 * err / p.sum())
        else:
            out, lse = attention_reference(q, keys[a:a + n], values[a:a + n], vis)
            # the kernel sums (q * scale) . code and q . zero apart: bound by |terms|, not |key|
            tol_out, tol_lse = attention_tolerance(q, keys_abs[a:a + n], values_abs[a:a + n], vis)
        arrays = {"rows": rows, "head_dim": d, "G": G, "bits": bits, "group_size": gs, "a": a, "n": n,
                  "krow": krow, "vrow": vrow, "q": q, "kcodes": kbytes, "kscale": kscale.astype(np.float16),
                  "kzero": kzero.astype(np.float16), "vcodes": vbytes, "vscale": vscale.astype(np.float16),
                  "vzero": vzero.astype(np.float16),
                  "expect:out": out, "tol:out": 2 * tol_out, "expect:lse": lse, "tol:lse": 2 * tol_lse}
        if nk:
            arrays.update(kidx=kidx)
        if nv:
            arrays.update(vidx=vidx, voscale=voscale, vozero=vozero, vocodes=vocodes)
        if visible is not None:
            arrays["visible"] = visible
        yield f"bits={bits} d={d} G={G} group={gs} rows={rows} outliers={nk}/{nv} tokens={a}+{n} {vis_kind}", arrays


TGROUP_SHAPES = [  # (D, d, G, rows, widths (k n3, k n4, v n3, v n4), a, n, visible)
    (64, 64, 64, 3, (64, 48, 64, 0), 0, 64, "all"), (128, 128, 64, 4, (128, 112, 128, 0), 5, 50, "causal"),
    (64, 40, 48, 7, (48, 0, 0, 0), 0, 48, "random"), (16, 9, 5, 2, (16, 16, 16, 16), 1, 4, "all"),
    (32, 20, 33, 5, (32, 16, 16, 0), 3, 30, "causal"), (256, 256, 16, 1, (256, 192, 256, 256), 0, 16, "all"),
    (128, 100, 80, 8, (64, 32, 128, 128), 17, 60, "random"), (64, 64, 64, 4, (64, 32, 64, 0), 0, 64, "sharp"),
]


def cases_attend_tgroup(rng):
    """A TurboQuant group head (rv_turbo.h) built from random codes with tests/turbo_format.py:
    scores a_t qscale (q8 . c_t) + flag_t (q . mu), values b_t c_t in the rotated domain, against
    float64 attention over exactly those vectors (the int8 query is an input: the kernels'
    integer dot products are exact). With AVX512-VNNI and on AVX2 the values are summed with 8-bit weights
    per 16-token block and row: a weight's error is at most half of max/255 of its block, which
    the tolerance adds: sum over blocks of max_b (p_t b_t) / 510 * sum_t in b |c_t| / l."""
    import turbo_format as tf
    for D, d, G, rows, (kn3, kn4, vn3, vn4), a, n, vis_kind in TGROUP_SHAPES:
        Gp = -(-G // 16) * 16
        kc = rng.integers(0, 1 << 30, (Gp, D)) % (1 << tf.coord_widths(D, kn3, kn4))
        vc = rng.integers(0, 1 << 30, (Gp, D)) % (1 << tf.coord_widths(D, vn3, vn4))
        kcodes, vcodes = tf.pack_codes(kc, kn3, kn4), tf.pack_codes(vc, vn3, vn4)
        ktab, vtab = tf.tables(D, kn3, kn4)[0], tf.tables(D, vn3, vn4)[1]
        kn_lo, kn_step, vn_lo, vn_step = (float(np.float32(x)) for x in rng.uniform(-4, -2, 4) * [1, 0.01, 1, 0.01])
        knorm = rng.integers(0, 256, Gp).astype(np.uint8)
        vnorm = rng.integers(0, 256, Gp).astype(np.uint8)
        knorm[rng.random(Gp) < 0.05] = 0                       # zero vectors
        kflag = rng.integers(0, 256, Gp // 8).astype(np.uint8)
        kmu = (rng.standard_normal(d) * 2.0).astype(np.float32)
        sharp = vis_kind == "sharp"
        q8 = rng.integers(-127, 128, (rows, D)).astype(np.int8)
        qsum = q8.astype(np.int32).sum(1).astype(np.int32)
        ka, va = tf.scales(knorm, kn_lo, kn_step), tf.scales(vnorm, vn_lo, vn_step)
        flags = np.unpackbits(kflag, bitorder="little")[:Gp].astype(np.float64)
        kvec = ka[:, None] * tf.centroids(kc, kn3, kn4)                   # rotated keys [Gp][D]
        # scores of spread ~1.5 (softmax far from one-hot; "sharp": ~6), half from the mean term
        spread = 6.0 if sharp else 1.5
        qscale = (spread / np.maximum((kvec @ q8.T.astype(np.float64)).std(0), 1e-30)).astype(np.float32)
        qplain = rng.standard_normal((rows, d))
        qplain = (qplain * spread / np.maximum(np.abs(qplain @ kmu).reshape(rows, 1), 1e-30)).astype(np.float32)
        vvec = va[:, None] * tf.centroids(vc, vn3, vn4)
        q_aug = np.concatenate([qscale[:, None].astype(np.float64) * q8, qplain], 1)
        k_aug = np.concatenate([kvec, flags[:, None] * kmu.astype(np.float64)], 1)
        visible, vis = _group_visible(rng, "all" if sharp else vis_kind, rows, n)
        width = D + d
        vwide = np.concatenate([vvec, np.zeros((Gp, d))], 1)
        out, lse = attention_reference(q_aug, k_aug[a:a + n], vwide[a:a + n], vis)
        tol_out, tol_lse = attention_tolerance(q_aug, np.abs(k_aug[a:a + n]) * 1.0, np.abs(vwide[a:a + n]), vis)
        out, tol_out = out[:, :D], tol_out[:, :D]
        # 8-bit weights (avx512vnni, avx2): per 16-token block (from token a // 16 * 16) and row
        cabs = np.abs(tf.centroids(vc, vn3, vn4))
        for r in range(rows):
            if vis[r] <= 0:
                continue
            s = k_aug[a:a + vis[r]] @ q_aug[r]
            p = np.exp(s - s.max())
            w = np.zeros(Gp)
            w[a:a + vis[r]] = p * va[a:a + vis[r]]
            err = np.zeros(D)
            for b0 in range(a // 16 * 16, a + vis[r], 16):
                err += w[b0:b0 + 16].max() / 510 * cabs[b0:b0 + 16][w[b0:b0 + 16] > 0].sum(0)
            tol_out[r] += 1.01 * err / p.sum()
        arrays = {"rows": rows, "D": D, "d": d, "G": G, "Gp": Gp, "k_n3": kn3, "k_n4": kn4, "v_n3": vn3,
                  "v_n4": vn4, "a": a, "n": n, "kn_lo": kn_lo, "kn_step": kn_step, "vn_lo": vn_lo,
                  "vn_step": vn_step, "kcodes": kcodes.ravel(), "vcodes": vcodes.ravel(), "ktab": ktab,
                  "vtab": vtab, "knorm": knorm, "vnorm": vnorm, "kflag": kflag, "kmu": kmu,
                  "qplain": qplain.ravel(), "q8": q8.view(np.uint8).ravel(), "qscale": qscale, "qsum": qsum,
                  "expect:out": out, "tol:out": 2 * tol_out, "expect:lse": lse, "tol:lse": 2 * tol_lse}
        if visible is not None:
            arrays["visible"] = visible
        yield (f"D={D} d={d} G={G} rows={rows} widths={kn3}/{kn4}/{vn3}/{vn4} tokens={a}+{n} {vis_kind}"), arrays


def _state(rng, rows, d, lse_offsets, empty):
    """A float32 online-softmax state (m, l, acc) per row; rows in `empty` saw no key."""
    m = (rng.standard_normal(rows) + lse_offsets).astype(np.float32)
    l = rng.uniform(0.5, 20, rows).astype(np.float32)
    acc = (rng.standard_normal((rows, d)) * l[:, None]).astype(np.float32)
    m[empty], l[empty], acc[empty] = -np.inf, 0, 0
    return m, l, acc


def _state_summary(m, l, acc):
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(l > 0, m.astype(np.float64) + np.log(l.astype(np.float64)), -np.inf)
        out = np.where(l[:, None] > 0, acc.astype(np.float64) / l[:, None], 0.0)
    return lse, out


def cases_attn_merge(rng):
    # rows: ordinary, far apart both ways (one side underflows), self empty, other empty, both
    offsets_a = np.array([0.0, 0.0, 120.0, -120.0, 0.0, 0.0, 0.0, 3.0])
    offsets_b = np.array([0.5, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    rows = offsets_a.size
    for d in (1, 5, 16, 64, 130):
        a = _state(rng, rows, d, offsets_a, [4, 6])
        b = _state(rng, rows, d, offsets_b, [5, 6])
        (lse_a, out_a), (lse_b, out_b) = _state_summary(*a), _state_summary(*b)
        lse = np.logaddexp(lse_a, lse_b)
        with np.errstate(invalid="ignore"):
            wa = np.nan_to_num(np.exp(lse_a - lse))
            wb = np.nan_to_num(np.exp(lse_b - lse))
        out = wa[:, None] * out_a + wb[:, None] * out_b
        scale = np.maximum(np.abs(out_a), np.abs(out_b)).max(axis=1, keepdims=True)
        finite_m = np.nan_to_num(np.maximum(np.abs(a[0]), np.abs(b[0])), posinf=0.0)
        yield f"d={d}", {"rows": rows, "head_dim": d, "m": a[0], "l": a[1], "acc": a[2],
                         "m_other": b[0], "l_other": b[1], "acc_other": b[2],
                         "expect:out": out, "tol:out": np.broadcast_to(16 * F32_EPS * scale, out.shape) + 1e-30,
                         "expect:lse": lse, "tol:lse": 16 * F32_EPS * (finite_m + 1.0).astype(np.float64)}


def cases_attn_finalize(rng):
    for d, gap in ((1, 0), (3, 2), (16, 0), (17, 5), (64, 16), (256, 1)):
        rows = 5
        l = rng.uniform(0.1, 50, rows).astype(np.float32)
        l[2] = 0
        acc = (rng.standard_normal((rows, d)) * 10).astype(np.float32)
        acc[2] = 0
        stride = d + gap
        out_init = np.full((rows, stride), 7.25, np.float32)   # the gaps must keep this
        want = out_init.astype(np.float64)
        want[:, :d] = acc / np.where(l > 0, l, 1).astype(np.float64)[:, None]
        tol = np.zeros_like(want)
        tol[:, :d] = 2 * F32_EPS * np.abs(want[:, :d])
        n = (rows - 1) * stride + d   # the last row's gap is not the kernel's
        yield f"d={d} gap={gap}", {"rows": rows, "head_dim": d, "out_stride": stride, "l": l,
                                   "acc": acc.reshape(-1), "out": out_init.reshape(-1)[:n],
                                   "expect:out": want.reshape(-1)[:n], "tol:out": tol.reshape(-1)[:n]}


# ---------------------------------------------------------------- GGUF block matmul family
sys.path.insert(0, str(HERE.parent))     # tests/qblocks.py: random blocks, Q8 reference
import qblocks  # noqa: E402


def cases_quantize_act(rng):
    """The Q8 activations bit for bit: numpy float32 arithmetic, round half to even."""
    for n, k in ((1, 32), (2, 64), (3, 96), (5, 576), (4, 1536)):
        x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 100)).astype(np.float32)
        x[0, :32] = 0                               # d = 0: codes 0
        if k >= 64:
            x[-1, 32:64] = x[-1, 32]                # a constant block
        yield f"n={n} k={k}", _quantize_case(x)
    # ties at half a step (d = 1 exactly): 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    x = np.zeros((2, 64), np.float32)
    x[:, 0] = 127.0
    x[:, 1:8] = [2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 126.5]
    x[1, 32:] = np.linspace(-127, 127, 32, dtype=np.float32)
    yield "ties", _quantize_case(x)


def _quantize_case(x):
    q, d, s32, s16 = qblocks.quantize_q8(x)
    return {"x": x, "n": x.shape[0], "k": x.shape[1], "exact:q": q.astype(np.float32), "exact:d": d,
            "exact:s32": s32, "exact:s16": s16, "exact:q4": qblocks.nibble_order(q).astype(np.float32)}


# (rows, n columns, r0, r1): tails of every vector width, partial 16-row panels, the switch
# from matrix-vector to the packed GEMM (4 columns) and its column tails
WMATMUL_SHAPES = ((1, 1, 0, 1), (17, 1, 0, 17), (19, 2, 3, 19), (33, 3, 0, 33), (35, 4, 1, 35),
                  (21, 5, 0, 21), (40, 7, 5, 37), (16, 13, 0, 16))


def cases_wmatmul(rng):
    for name in qblocks.ALL_TYPES:
        for cols in ((256, 512) if qblocks.BLOCKS[name][0] == 256 else (32, 96, 160)):
            for i, (rows, n, r0, r1) in enumerate(WMATMUL_SHAPES):
                data, w = qblocks.random_matrix(rng, name, rows, cols)
                x = rng.standard_normal((n, cols)).astype(np.float32)
                ref, tol = qblocks.matmul_reference(w[r0:r1], x, name)
                acc = i % 2
                y0 = rng.standard_normal(ref.shape).astype(np.float32)
                if acc:
                    ref, tol = ref + y0, tol + F32_EPS * np.abs(ref + y0)
                yield f"{name} {rows}x{cols} n={n} rows {r0}:{r1} acc={acc}", {
                    "w": data.reshape(-1), "type": qblocks.type_id(name), "rows": rows, "cols": cols,
                    "x": x, "n": n, "r0": r0, "r1": r1, "accumulate": acc, "y": y0,
                    "expect:y": ref, "tol:y": tol}


def _dequant_tolerance(name, data, cols):
    """Per value: 4 eps of the largest term a block's formula adds (sw u and the zero point /
    minimum), from the block's f16 fields -- rounding only; a wrong code is off by >= sw."""
    if name in qblocks.FLOATS:
        return np.zeros(cols)
    bv, bb = qblocks.BLOCKS[name]
    blocks = data.reshape(-1, bb)
    f16 = lambda off: np.abs(blocks[:, off:off + 2].copy().view(np.float16).astype(np.float64)[:, 0])
    bound = {"Q4_0": lambda: 16 * f16(0), "Q4_1": lambda: 15 * f16(0) + f16(2),
             "Q8_0": lambda: 256 * f16(0), "Q4_K": lambda: 63 * 31 * f16(0) + 63 * f16(2),
             "Q5_K": lambda: 63 * 31 * f16(0) + 63 * f16(2), "Q6_K": lambda: 128 * 96 * f16(208)}[name]()
    return np.repeat(4 * F32_EPS * bound, bv)


def cases_wrow_f32(rng):
    for name in qblocks.ALL_TYPES:
        cols = 512 if qblocks.BLOCKS[name][0] == 256 else 96
        data, w = qblocks.random_matrix(rng, name, 3, cols)
        for row in (0, 2):
            exact = name in qblocks.FLOATS
            case = {"w": data.reshape(-1), "type": qblocks.type_id(name), "rows": 3, "cols": cols, "row": row}
            if exact:
                case["exact:out"] = w[row]
            else:
                case["expect:out"] = w[row].astype(np.float64)
                case["tol:out"] = _dequant_tolerance(name, data[row], cols) + 1e-30
            yield f"{name} row {row}", case


def cases_rmsnorm_f32(rng):
    for n in (1, 7, 16, 33, 100, 576):
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        g = rng.uniform(0.5, 2.0, n).astype(np.float32)
        for gain, in_place in ((True, 0), (False, 0), (True, 1)):
            x64 = x.astype(np.float64)
            r = 1.0 / np.sqrt(np.mean(x64 * x64) + 1e-5)
            want = x64 * r * (g.astype(np.float64) if gain else 1.0)
            case = {"x": x, "eps": 1e-5, "in_place": in_place, "expect:x": want,
                    "tol:x": (2 * np.sqrt(n) + 8) * F32_EPS * np.abs(want) + 1e-30}
            if gain:
                case["gain"] = g
            yield f"n={n} gain={gain} in_place={in_place}", case


def cases_rope_pairs_f32(rng):
    for vectors, dim in ((1, 2), (3, 64), (2, 18), (4, 130)):
        x = rng.standard_normal((vectors, dim)).astype(np.float32)
        ang = rng.uniform(-100, 100, dim // 2)
        c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x0, x1 = x[:, 0::2].astype(np.float64), x[:, 1::2].astype(np.float64)
        want = np.empty((vectors, dim))
        want[:, 0::2] = x0 * c - x1 * s
        want[:, 1::2] = x0 * s + x1 * c
        tol = np.empty_like(want)
        tol[:, 0::2] = tol[:, 1::2] = 4 * F32_EPS * (np.abs(x0) + np.abs(x1)) + 1e-30
        yield f"{vectors}x{dim}", {"x": x, "cos": c, "sin": s, "vectors": vectors, "dim": dim,
                                   "expect:x": want.reshape(-1), "tol:x": tol.reshape(-1)}


def cases_swiglu_f32(rng):
    for n in LENGTHS[1:]:
        g = (rng.standard_normal(n) * 6).astype(np.float32)
        if n > 4:
            g[:4] = [-95.0, -88.0, 88.0, 95.0]    # exp(-g) under- and overflows
        u = rng.standard_normal(n).astype(np.float32)
        g64 = g.astype(np.float64)
        with np.errstate(over="ignore"):
            want = g64 * u / (1.0 + np.exp(-g64))
        yield f"n={n}", {"gate": g, "up": u, "expect:out": want, "tol:out": 1e-6 * np.abs(want) + 1e-35}
