"""Scripts for the C cache driver check (cache_check.c), the float64 model they are checked
against, and its build (the kernel harness's Target, building cache_check with the caches'
sources).

A script drives one cache through what a Runtime does to it -- steps (begin, make room,
append every layer, attend, commit), decode, forks with copy-on-write, a rolled-back step,
truncation, eviction under a full budget, export and import -- and records every input. The
model keeps, per sequence and layer, the float32 rows fed in, so a check can tell what every
READ must hold (the paged cache: exactly float16 of them; the two-tier cache: its newest
tokens exactly, its cold ones within the format's bound) without asking the cache.
"""
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# cache_check.c's operation codes and dtypes
(OP_PAGED, OP_TWOTIER, OP_ADD, OP_FORK, OP_RELEASE, OP_BEGIN, OP_COMMIT, OP_ROLLBACK, OP_APPEND, OP_ROOM,
 OP_EVICT, OP_TRUNCATE, OP_READ, OP_ATTEND, OP_EXPORT, OP_IMPORT, OP_STATS) = range(1, 18)
_DTYPES = [np.float32, np.uint16, np.int32, np.float64, np.uint8, np.int64]
_CODES = {np.dtype(t): i for i, t in enumerate(_DTYPES)}
RV_OK, RV_EINVAL, RV_EFULL = 0, -2, -3
ROOM_OK, ROOM_FULL, ROOM_TOO_MANY = 0, 1, 2
MAX_IDS = 16
# the channels Model.kv makes x20 larger (the formats' outlier paths)
BIG_KEY_CHANNELS, BIG_VALUE_CHANNELS = [3, 17], [5]


def cache_sources():
    """The C the caches link (setup.py's _kvcache extension without its .pyx): kvcache/ and
    LINKED_DIRS, relative to csrc."""
    from kernel_harness import CSRC, _setup_literal
    dirs = ["kvcache", *_setup_literal("LINKED_DIRS")["_kvcache"]]
    return [str(p.relative_to(CSRC)) for d in dirs for p in sorted((CSRC / d).glob("*.c"))]


def cache_target(kernel_target):
    """cache_check built like kernel_target (native or aarch64), serially: the scheduler's
    OpenMP pragmas stay unused (the check calls it with one thread)."""
    return kernel_target.for_program("cache_check", cache_sources(), cflags=["-Wno-unknown-pragmas"])


@dataclass
class Config:
    """One cache: paged (dtype 'f16' / 'f32') or two-tier (a cold format of the codec table)."""
    name: str
    cold: str = None            # None: paged
    dtype: str = "f16"
    bits: float = 3.5
    pool: bool = True
    layers: int = 2
    kv_heads: int = 2
    heads: int = 4
    head_dim: int = 40
    block_size: int = 16
    num_blocks: int = 24
    hot: int = 16
    group_tokens: int = 16
    group_size: int = 16
    max_tokens: int = 160

    @property
    def paged(self):
        return self.cold is None


@dataclass
class Read:
    """A READ: what the model says the sequence holds in `layer` (float32 inputs, oldest
    first; the cache may have evicted a prefix of them)."""
    op: int
    seq: int
    layer: int
    k: np.ndarray
    v: np.ndarray
    stats_op: int               # the STATS right after it (its lengths)


@dataclass
class Attend:
    op: int
    seq: int
    layer: int
    q: np.ndarray
    causal: bool
    read: Read                  # the K/V the cache held when it attended


@dataclass
class Script:
    config: Config
    ops: list = field(default_factory=list)         # encoded operations
    reads: list = field(default_factory=list)
    attends: list = field(default_factory=list)
    exports: dict = field(default_factory=dict)     # layer -> the EXPORT's op index
    export_reads: dict = field(default_factory=dict)    # layer -> the READ right before it
    compare: list = field(default_factory=list)     # (op a, op b): outputs that must be equal

    def add(self, op, args=(), arrays=()):
        args = list(args) + [0] * (8 - len(args))
        out = b"RVOP" + struct.pack("<I8qI", op, *args, len(arrays))
        for a in arrays:
            a = np.ascontiguousarray(a)
            out += struct.pack("<IQ", _CODES[a.dtype], a.size) + a.tobytes()
        self.ops.append(out)
        return len(self.ops) - 1

    def write(self, path):
        Path(path).write_bytes(b"".join(self.ops))


class Model:
    """Writes a script and keeps the float64 model of what every sequence holds."""

    def __init__(self, config, rng):
        self.c, self.rng = config, rng
        self.s = Script(config)
        self.tokens = {}        # id -> per layer [k rows, v rows] (float32 inputs, oldest first)
        c = config
        if c.paged:
            self.s.add(OP_PAGED, [c.layers, c.kv_heads, c.head_dim, c.block_size, c.num_blocks,
                                  0 if c.dtype == "f32" else 1])
        else:
            self.s.add(OP_TWOTIER, [c.layers, c.kv_heads, c.head_dim, c.hot, c.group_tokens, c.group_size,
                                    c.max_tokens, int(c.pool)],
                       [np.frombuffer(c.cold.encode(), np.uint8), np.array([c.bits])])

    def kv(self, n):
        """n tokens of K/V with a few channels x20 (real keys have them: the formats' outlier
        paths run)."""
        c = self.c
        k = self.rng.standard_normal((n, c.kv_heads, c.head_dim)).astype(np.float32)
        v = self.rng.standard_normal((n, c.kv_heads, c.head_dim)).astype(np.float32)
        k[:, :, BIG_KEY_CHANNELS] *= 20
        v[:, :, BIG_VALUE_CHANNELS] *= 20
        return k, v

    def add(self, seq):
        self.s.add(OP_ADD, [seq])
        self.tokens[seq] = [[np.zeros((0, self.c.kv_heads, self.c.head_dim), np.float32)] * 2
                            for _ in range(self.c.layers)]

    def fork(self, parent, child, expect=RV_OK):
        self.s.add(OP_FORK, [parent, child, expect])
        if expect == RV_OK:
            self.tokens[child] = [list(t) for t in self.tokens[parent]]

    def release(self, seq):
        self.s.add(OP_RELEASE, [seq])
        del self.tokens[seq]

    def room(self, seqs, n, evict=True, expect=ROOM_OK):
        self.s.add(OP_ROOM, [-1, int(evict), expect],
                   [np.array(seqs, np.int64), np.array(n, np.int64)])

    def append(self, seq, layer, k, v, expect=RV_OK, f16=False):
        """Appends float32 k, v, or (f16) their float16 roundings as binary16 input."""
        if f16:
            k, v = (x.astype(np.float16).astype(np.float32) for x in (k, v))
        src = (k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)) if f16 else (k, v)
        self.s.add(OP_APPEND, [seq, layer, len(k), int(f16), expect], src)
        if expect == RV_OK:
            t = self.tokens[seq][layer]
            t[0], t[1] = np.concatenate([t[0], k]), np.concatenate([t[1], v])

    def read(self, seq, layer):
        op = self.s.add(OP_READ, [seq, layer])
        k, v = self.tokens[seq][layer]
        r = Read(op, seq, layer, k.copy(), v.copy(), self.s.add(OP_STATS))
        self.s.reads.append(r)
        return r

    def attend(self, seq, layer, q_len, causal=True, q=None):
        c = self.c
        if q is None:
            q = self.rng.standard_normal((q_len, c.heads, c.head_dim)).astype(np.float32)
        op = self.s.add(OP_ATTEND, [seq, layer, c.heads, q_len, int(causal)], [q])
        a = Attend(op, seq, layer, q, causal, self.read(seq, layer))
        self.s.attends.append(a)
        return a

    def step(self, seq, n, attend=True, end="commit", f16=False, cover=()):
        """One Runtime step of n tokens on seq: begin, room, then per layer append and attend.
        The transaction also covers the sequences `cover` (as a Runtime widens it when the
        stepping sequence alone cannot make room: then the others may give up tokens)."""
        txn = [seq, *cover]
        before = {s: [list(t) for t in self.tokens[s]] for s in txn}
        for s in txn:
            self.s.add(OP_BEGIN, [s, RV_OK])
        if not self.c.paged:
            self.room([seq], [n])
        for layer in range(self.c.layers):
            self.append(seq, layer, *self.kv(n), f16=f16)
            if attend:
                self.attend(seq, layer, n)
        for s in txn:
            self.s.add(OP_COMMIT if end == "commit" else OP_ROLLBACK, [s])
        if end != "commit":
            self.tokens.update(before)

    def truncate(self, seq, n, expect=RV_OK):
        self.s.add(OP_TRUNCATE, [seq, n, expect])
        if expect == RV_OK:
            for t in self.tokens[seq]:
                t[0], t[1] = t[0][:n], t[1][:n]

    def snapshot(self, seq):
        """READs of every layer (their outputs are compared with a later snapshot's)."""
        return [self.read(seq, layer).op for layer in range(self.c.layers)]


def driver_script(config, seed=0):
    """What a Runtime does to a cache, in one script: a prefill and decode steps, a fork and
    copy-on-write, a rolled-back step, truncation, eviction under a full budget (two-tier) or
    a full pool (paged), export and import (a corrupted blob refused)."""
    m = Model(config, np.random.default_rng(seed))
    s, c = m.s, config
    m.add(0)
    m.step(0, 37)                                   # prefill: causal tiles, migration at commit
    for i in range(12):                             # decode (one step with float16 input)
        m.step(0, 1, f16=(i == 5))
    m.fork(0, 1)
    m.step(1, 5)                                    # copy-on-write of the shared last block
    m.step(0, 3)
    for seq in (0, 1):
        m.attend(seq, 1, 3, causal=False)
    before = m.snapshot(1)
    m.step(1, 7, end="rollback")                    # exactly as before
    s.compare += list(zip(before, m.snapshot(1)))
    m.truncate(1, 50)                               # into the shared / cold part
    m.attend(1, 0, 2)
    m.add(2)
    if c.paged:
        free = c.num_blocks * c.block_size - 40     # more than the free blocks hold
        m.s.add(OP_ROOM, [-1, 0, RV_OK], [np.array([2], np.int64), np.array([free], np.int64)])
        m.append(2, 0, *m.kv(free), expect=RV_EFULL)
        m.release(1)                                # its blocks come back
        m.step(2, 30)
    else:
        m.room([2], [c.max_tokens + 1], expect=ROOM_TOO_MANY)
        m.room([2], [c.max_tokens - 20], evict=False, expect=ROOM_FULL)
        m.step(2, c.max_tokens - 20, cover=(0, 1))  # evicts the oldest of 0 and 1
        m.step(0, 4, cover=(1, 2))                  # 0's oldest, then the others' again
        s.add(OP_EVICT, [1, 9])
        m.attend(1, 1, 1)
    s.add(OP_STATS)
    # export / import of 2 (it holds the most, cold and hot) into 3: the same tokens
    q = m.rng.standard_normal((1, c.heads, c.head_dim)).astype(np.float32)
    attended = m.attend(2, 1, 1, q=q).op
    for layer in range(c.layers):
        s.export_reads[layer] = m.read(2, layer).op
        s.exports[layer] = s.add(OP_EXPORT, [2, layer])
    m.add(3)
    if not c.paged:                                 # a blob one byte short is refused
        s.add(OP_IMPORT, [3, 0, RV_EINVAL, 1])
    for layer in range(c.layers):                   # room made by evicting the others' oldest
        s.add(OP_IMPORT, [3, layer, RV_OK, 0, 1])
        m.tokens[3][layer] = [t.copy() for t in m.tokens[2][layer]]
        s.compare.append((s.export_reads[layer], m.read(3, layer).op))
    s.compare.append((attended, m.attend(3, 1, 1, q=q).op))
    m.step(3, 2, cover=[i for i in m.tokens if i != 3])     # the imported sequence goes on
    s.add(OP_STATS)
    return s


def import_script(config, exported):
    """Imports another run's export of every layer (dict layer -> its five arrays) into a new
    sequence and reads it: sequence files move between machines."""
    m = Model(config, np.random.default_rng(1))
    m.add(0)
    for layer, arrays in exported.items():
        m.s.add(OP_IMPORT, [0, layer, RV_OK, 0, 1], arrays if not config.paged else arrays[3:])
    return m.s, [m.s.add(OP_READ, [0, layer]) for layer in exported]


# ---------------------------------------------------------------- running

class Run:
    """One run of cache_check: outputs[(op, field)] -> array, the statuses it printed."""

    def __init__(self, proc, out_path):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.unsupported = proc.returncode == 77
        self.failures = [ln for ln in proc.stdout.splitlines() if not ln.startswith(("table", "done"))]
        self.outputs = {}
        data = Path(out_path).read_bytes() if Path(out_path).exists() else b""
        pos = 0
        while pos < len(data):
            op, fld, dt, count = struct.unpack_from("<IIIQ", data, pos)
            pos += 20
            dtype = np.dtype(_DTYPES[dt])
            self.outputs[op, fld] = np.frombuffer(data, dtype, count, pos).copy()
            pos += count * dtype.itemsize

    def problems(self):
        if self.returncode == 0 and not self.failures:
            return ""
        return f"exit code {self.returncode}:\n{self.stdout[-3000:]}\n{self.stderr[-2000:]}"

    def kv(self, read, config):
        shape = (-1, config.kv_heads, config.head_dim)
        return self.outputs[read.op, 0].reshape(shape), self.outputs[read.op, 1].reshape(shape)

    def lengths(self, stats_op, config):
        """(length, cold length) per (id, layer) from a STATS."""
        return (self.outputs[stats_op, 1].reshape(MAX_IDS, config.layers),
                self.outputs[stats_op, 2].reshape(MAX_IDS, config.layers))


def run(target, binary, script, isa, workdir, tag):
    from kernel_harness import child_env
    path, out = Path(workdir) / f"{tag}.script", Path(workdir) / f"{tag}-{target.name}-{isa}.out"
    script.write(path)
    proc = subprocess.run([*target.run_prefix, str(binary), str(path), str(out), isa],
                          capture_output=True, text=True, timeout=300, env=child_env())
    return Run(proc, out)


def export_arrays(run_, script, layer):
    op = script.exports[layer]
    return [run_.outputs[op, f] for f in range(5)] if (op, 0) in run_.outputs else \
        [None, None, None, run_.outputs[op, 3], run_.outputs[op, 4]]
