"""Fuzz every file reader ruvpy owns, over mutated real files.

    python tools/fuzz.py [--runs 100000] [--readers sequence-file,export-bytes,gguf]
                         [--engine atheris|random] [--seed 1] [--json out.json] [--artifacts DIR]

Readers (each through its public entry point):
  sequence-file  Runtime.load_sequence(path): snapshot files written by save_sequence
  export-bytes   Runtime.import_sequence(data): the bytes of export_sequence (the KV export,
                 whose meta and arrays go on to the cache's import_sequence and cold-group codec)
  gguf           ruvpy.models.load(path): a small Llama GGUF written by the gguf package, with
                 Q8_0, Q4_1, F16 and F32 tensors and a byte-level BPE vocabulary
Seeds are real files: sequences of paged (fp16), two-tier (q4, q8) and TurboQuant runtimes,
with cold groups, an eviction skip and a truncation cut, exported or saved by ruvpy itself.

Mutations (tools/fuzz.py mutate()): raw bytes (bit flips, interesting integers, insertions,
deletions, truncation, splicing of two seeds); the same with the SHA-256 checksum recomputed,
so the input gets past it; and structure-aware ones that decode the file, change one value of
its JSON header (huge, negative, non-integral, Infinity, wrong types, deep nesting, dropped
keys), one array directory entry or bytes inside one array (cold-group codes and scales), and
encode it again with a valid checksum. GGUF: raw byte mutations biased towards its header,
metadata and tensor directory (the part a reader parses).

Each input must either load -- then the sequence is attended over and removed, and the
runtime must have exactly its sequences of before -- or raise one of the documented
exceptions: SequenceFileError (a ValueError) or KVCacheFull (a MemoryError) for sequences,
ValueError for GGUF files. A failed load must change nothing. Anything else is a finding: its
input is saved under --artifacts and the run goes on. A crash (signal) ends the reader's run
and is reported.

--engine atheris (the default when atheris is importable): libFuzzer's coverage-guided loop
over Python coverage of ruvpy and gguf, with the mutations above as its custom mutator. One
subprocess per reader (libFuzzer owns its process). --engine random: the same mutations chosen
by a seeded random generator, in this process (what the test suite runs, reproducibly).
Prints progress, a table and JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a source checkout (built in place)
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

READERS = ("sequence-file", "export-bytes", "gguf")
_PREAMBLE = struct.Struct("<8sIIQQ")
_DIGEST = 32
INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256,
                    4095, 4096, 65535, 65536, 2**31 - 1, 2**31, -2**31, 2**32 - 1, 2**32,
                    2**53, 2**63 - 1, 2**63, -2**63, 2**64 - 1, 2**64, 10**30]
INTERESTING_VALUES = INTERESTING_INTS + [
    0.5, -0.0, 1e300, 1e-300, float("inf"), float("-inf"), float("nan"), "", "x", "float16",
    "<f2", "|u1", "<i8", "O", "V8", "<U4", ">f4", "int64", None, True, False, [], {}, [0], [-1],
    [2**62, 2**62], {"a": 1}]


# ------------------------------------------------------------------------------------------
# seeds: real files made by ruvpy (and by the gguf package)
# ------------------------------------------------------------------------------------------

def runtime_configs():
    """The configurations whose sequence files seed and receive the inputs."""
    from ruvpy import RuntimeConfig
    base = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_tokens=512)
    return {
        "paged": RuntimeConfig(**base, kv_cache="paged", block_size=16),
        "two-tier-q4": RuntimeConfig(**base, kv_cache="two-tier", cold="q4", hot_tokens=16,
                                     group_size=32, migration_batch=32),
        "two-tier-q8": RuntimeConfig(**base, kv_cache="two-tier", cold="q8", hot_tokens=16,
                                     group_size=32, migration_batch=32,
                                     policy="evict-oldest", memory_budget=160 * 1024,
                                     max_sequences=4),
        "turbo": RuntimeConfig(**base, kv_cache="turbo", hot_tokens=16, migration_batch=32),
    }


def _fill(rt, seq, n, rng):
    cfg = rt.config
    with rt.step([seq], [n]) as step:
        for layer in range(cfg.num_layers):
            step.attention(layer, rng.standard_normal((n, cfg.num_heads, cfg.head_dim), np.float32),
                           rng.standard_normal((n, cfg.num_kv_heads, cfg.head_dim), np.float32),
                           rng.standard_normal((n, cfg.num_kv_heads, cfg.head_dim), np.float32))


def sequence_seeds():
    """[(config name, bytes)]: exported sequences of every configuration, short and long
    (cold groups), a fork, a truncated one (a cut cold group) and, under the q8 budget, one
    whose oldest tokens were evicted (a skip)."""
    from ruvpy import Runtime
    rng = np.random.default_rng(0)
    seeds = []
    for name, cfg in runtime_configs().items():
        with Runtime(cfg) as rt:
            short, long = rt.add_sequence(), rt.add_sequence()
            _fill(rt, short, 5, rng)
            for n in (40, 40, 3):
                _fill(rt, long, n, rng)
            seeds.append((name, rt.export_sequence(short)))
            seeds.append((name, rt.export_sequence(long)))
            fork = rt.fork_sequence(long)
            _fill(rt, fork, 1, rng)
            seeds.append((name, rt.export_sequence(fork)))
            try:
                rt.truncate_sequence(long, 50)
                seeds.append((name, rt.export_sequence(long)))
            except (AttributeError, ValueError):
                pass
            if cfg.policy == "evict-oldest":
                big = rt.add_sequence()
                for _ in range(6):
                    _fill(rt, big, 40, rng)
                seeds.append((name, rt.export_sequence(big)))
    return seeds


def gguf_seed(path):
    """Write a small real Llama GGUF (2 layers, hidden 64, 4/2 heads, vocab 288 byte-level
    BPE tokens with merges and control tokens; Q8_0, Q4_1, F16 and F32 tensors)."""
    import gguf
    from gguf.quants import quantize
    from ruvpy.models.tokenizer import _bytes_to_unicode

    rng = np.random.default_rng(1)
    hidden, heads, kv_heads, ffn, layers = 64, 4, 2, 128, 2
    head_dim = hidden // heads
    byte_tokens = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "o n", "Ġ a", "r e", "Ġ s",
              "e n", "a t", "o r", "Ġ o", "e s", "Ġ w", "i s", "i t", "Ġ c", "a l",
              "a r", "Ġ b", "Ġ f", "Ġ p", "o u", "l e", "Ġ m", "i c", "Ġ d", "Ġ h"]
    tokens = byte_tokens + [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    types = [1] * (vocab - 2) + [3, 3]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz-seed")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)

    def tensor(name, shape, qtype):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    Q8, Q41 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    tensor("token_embd.weight", (vocab, hidden), Q8)
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", (hidden,), F32)
        tensor(p + "ffn_norm.weight", (hidden,), F32)
        tensor(p + "attn_q.weight", (hidden, hidden), Q41)
        tensor(p + "attn_k.weight", (kv_heads * head_dim, hidden), Q41)
        tensor(p + "attn_v.weight", (kv_heads * head_dim, hidden), Q8)
        tensor(p + "attn_output.weight", (hidden, hidden), F16)
        tensor(p + "ffn_gate.weight", (ffn, hidden), Q41)
        tensor(p + "ffn_up.weight", (ffn, hidden), Q41)
        tensor(p + "ffn_down.weight", (hidden, ffn), Q8)
    tensor("output_norm.weight", (hidden,), F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------
# mutations
# ------------------------------------------------------------------------------------------

def mutate_bytes(data, rng, limit=None, others=()):
    """Raw byte mutations (1-4 of them) of `data`; `limit` biases positions to its first
    `limit` bytes (the part a reader parses)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        size = len(buf)
        span = min(size, limit) if limit and rng.random() < 0.8 else size
        pos = rng.randrange(span) if span else 0
        op = rng.randrange(8)
        if op == 0 and size:                                   # flip a bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and size:                                 # a random byte
            buf[pos] = rng.randrange(256)
        elif op == 2 and size:                                 # an interesting integer
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING_INTS) & ((1 << (8 * width)) - 1)
            buf[pos:pos + width] = value.to_bytes(width, "little")
        elif op == 3:                                          # insert bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and size:                                 # delete bytes
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 5:                                          # truncate
            del buf[pos:]
        elif op == 6 and size > 1:                             # copy a run inside
            src, n = rng.randrange(size), rng.randint(1, 32)
            buf[pos:pos + n] = buf[src:src + n]
        elif op == 7 and others:                               # splice another seed
            other = rng.choice(others)
            cut = rng.randrange(len(other)) if other else 0
            buf[pos:] = other[cut:]
    return bytes(buf)


def split_sequence_file(data):
    """(header bytes, data bytes) of a sequence file, or None when its framing is broken."""
    if len(data) < _PREAMBLE.size + _DIGEST:
        return None
    magic, _, _, header_bytes, data_bytes = _PREAMBLE.unpack_from(data)
    start = (_PREAMBLE.size + header_bytes + 63) & ~63
    if start + data_bytes + _DIGEST != len(data):
        return None
    return data[_PREAMBLE.size:_PREAMBLE.size + header_bytes], data[start:start + data_bytes]


def encode_raw(header_bytes, data_bytes, version=1):
    """A sequence file around these header and data bytes, with a valid checksum."""
    pad = ((_PREAMBLE.size + len(header_bytes) + 63) & ~63) - _PREAMBLE.size - len(header_bytes)
    body = (_PREAMBLE.pack(b"RUVPYSEQ", version, 0, len(header_bytes), len(data_bytes))
            + header_bytes + bytes(pad) + data_bytes)
    return body + hashlib.sha256(body).digest()


def fix_checksum(data):
    """`data` with its last 32 bytes replaced by the SHA-256 of the rest."""
    if len(data) < _DIGEST:
        return data
    return data[:-_DIGEST] + hashlib.sha256(data[:-_DIGEST]).digest()


def _nodes(obj, path=()):
    """Every (path, value) of a JSON tree."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _replace(obj, path, value, drop=False):
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


_DEEP = "@ruvpy-fuzz-deep:"    # a placeholder string: a list nested this deep


def interesting_value(rng, old):
    r = rng.random()
    if r < 0.05:            # deep nesting: spliced into the JSON text by mutate_structure
        return _DEEP + str(rng.choice((100, 1000, 100_000)))
    if r < 0.35 and isinstance(old, int) and not isinstance(old, bool):
        return old + rng.choice((-65, -64, -33, -32, -17, -16, -2, -1, 1, 2, 16, 32, 64))
    if r < 0.45 and isinstance(old, list) and old:
        old = list(old)
        if rng.random() < 0.5:
            del old[rng.randrange(len(old))]
        else:
            old.append(rng.choice(old))
        return old
    return rng.choice(INTERESTING_VALUES)


def mutate_structure(data, rng):
    """Decode a sequence file, change one thing in it and encode it with a valid checksum
    (None when `data` does not decode)."""
    parts = split_sequence_file(data)
    if parts is None:
        return None
    header_bytes, body = parts
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError):
        return None
    body = bytearray(body)
    arrays = header.get("arrays") if isinstance(header, dict) else None
    r = rng.random()
    if r < 0.4 and isinstance(arrays, list) and arrays and body:
        # bytes inside one array: codes, scales, fp16 values, cold-group sizes
        entry = rng.choice(arrays)
        try:
            start, n = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError):
            start, n = 0, len(body)
        n = max(1, min(n, len(body) - start)) if start < len(body) else len(body)
        start = start if start < len(body) else 0
        for _ in range(rng.randint(1, 8)):
            pos = start + rng.randrange(n)
            if rng.random() < 0.5:
                buf = rng.choice(INTERESTING_INTS) & 0xFFFFFFFFFFFFFFFF
                chunk = buf.to_bytes(8, "little")[:min(8, len(body) - pos)]
                body[pos:pos + len(chunk)] = chunk
            else:
                body[pos] ^= 1 << rng.randrange(8)
    else:
        nodes = list(_nodes(header))
        path, old = rng.choice(nodes[1:] or nodes)
        drop = bool(path) and rng.random() < 0.15
        try:
            header = _replace(header, path, interesting_value(rng, old), drop=drop)
        except (KeyError, IndexError, TypeError):
            return None
    try:
        text = json.dumps(header, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None
    if _DEEP in text:
        start = text.index('"' + _DEEP)
        end = text.index('"', start + 1) + 1
        depth = int(text[start + 1 + len(_DEEP):end - 1])
        text = text[:start] + "[" * depth + "]" * depth + text[end:]
    text = text.encode()
    if rng.random() < 0.1:                                   # and a data section resized
        body = body[:rng.randrange(len(body) + 1)] if rng.random() < 0.5 else body + bytes(64)
    return encode_raw(text, bytes(body))


def mutate(data, rng, kind, seeds):
    """One mutated input of reader `kind` from `data`."""
    try:
        return _mutate(data, rng, kind, seeds)
    except Exception:     # an input too odd for a structure-aware mutation: plain bytes then
        return mutate_bytes(data, rng, others=seeds)


def _mutate(data, rng, kind, seeds):
    if kind == "gguf":
        return mutate_bytes(data, rng, limit=GGUF_PARSE_BYTES.get(len(data), len(data)),
                            others=seeds)
    r = rng.random()
    if r < 0.25:
        return mutate_bytes(data, rng, limit=512, others=seeds)
    if r < 0.5:
        return fix_checksum(mutate_bytes(data, rng, limit=1024, others=seeds))
    out = mutate_structure(data, rng)
    if out is None:
        return fix_checksum(mutate_bytes(data, rng, others=seeds))
    return out


GGUF_PARSE_BYTES = {}   # seed size -> offset of its tensor data (where parsing ends)


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------

class Finding(Exception):
    """An input was handled wrongly (undocumented exception or changed state)."""


class SequenceTarget:
    """Feeds an input to one runtime of every configuration (an input made for another
    configuration is refused quickly, by its header)."""

    def __init__(self, kind, workdir):
        from ruvpy import Runtime
        self.kind = kind
        self.runtimes = {name: Runtime(cfg) for name, cfg in runtime_configs().items()}
        self.path = os.path.join(workdir, "input.ruvseq")
        rng = np.random.default_rng(5)
        for rt in self.runtimes.values():          # a resident sequence the inputs must not touch
            seq = rt.add_sequence()
            _fill(rt, seq, 20, rng)
        self.q = {name: rng.standard_normal((1, rt.config.num_heads, rt.config.head_dim), np.float32)
                  for name, rt in self.runtimes.items()}

    def close(self):
        for rt in self.runtimes.values():
            rt.close()

    def __call__(self, data):
        """'loaded', or the name of the documented exception it raised."""
        from ruvpy import KVCacheFull
        from ruvpy.seqfile import SequenceFileError
        if self.kind == "sequence-file":
            with open(self.path, "wb") as f:
                f.write(data)
        outcome = None
        for name, rt in self.runtimes.items():
            before = {s: (rt.position(s), rt.seq_len(s)) for s in rt.sequences}
            tokens = rt.cache.stats().tokens
            try:
                seq = (rt.load_sequence(self.path) if self.kind == "sequence-file"
                       else rt.import_sequence(data))
            except (SequenceFileError, KVCacheFull) as exc:
                after = {s: (rt.position(s), rt.seq_len(s)) for s in rt.sequences}
                if after != before or rt.cache.stats().tokens != tokens:
                    raise Finding(f"{name}: a failed load ({exc!r}) changed the runtime")
                outcome = outcome or type(exc).__name__
                continue
            except Exception as exc:
                raise Finding(f"{name}: undocumented {type(exc).__name__}: {exc}") from exc
            try:       # what loaded must be usable: attend over it (every tier) and decode once
                cfg = rt.config
                with rt.step([seq], [1]) as step:
                    for layer in range(cfg.num_layers):
                        k = np.zeros((1, cfg.num_kv_heads, cfg.head_dim), np.float32)
                        step.attention(layer, self.q[name], k, k)
                rt.export_sequence(seq)
            except (ValueError, MemoryError) as exc:
                # a full cache or a position past max_tokens may refuse the extra token
                if not isinstance(exc, MemoryError) and "position" not in str(exc) \
                        and "max" not in str(exc):
                    raise Finding(f"{name}: a loaded sequence fails: {exc!r}") from exc
            finally:
                rt.remove_sequence(seq)
            after = {s: (rt.position(s), rt.seq_len(s)) for s in rt.sequences}
            if after != before:
                raise Finding(f"{name}: load + remove changed the other sequences")
            outcome = "loaded"
        return outcome


class GGUFTarget:
    def __init__(self, workdir):
        self.path = os.path.join(workdir, "input.gguf")

    def close(self):
        pass

    def __call__(self, data):
        from ruvpy import models
        with open(self.path, "wb") as f:
            f.write(data)
        try:
            with np.errstate(all="ignore"):      # mutated weights may be inf/NaN: allowed
                model = models.load(self.path, max_tokens=32)
        except ValueError as exc:
            return type(exc).__name__ if type(exc) is ValueError else f"ValueError ({type(exc).__name__})"
        except Exception as exc:
            raise Finding(f"undocumented {type(exc).__name__}: {exc}") from exc
        try:
            with np.errstate(all="ignore"):
                model.forward(model.new_sequence(), [0, 1])
        except (ValueError, MemoryError) as exc:
            raise Finding(f"a loaded model fails: {exc!r}") from exc
        finally:
            model.close()
        return "loaded"


def make_target(kind, workdir):
    return GGUFTarget(workdir) if kind == "gguf" else SequenceTarget(kind, workdir)


def make_seeds(kind, workdir):
    if kind == "gguf":
        path = gguf_seed(os.path.join(workdir, "seed.gguf"))
        import gguf
        reader = gguf.GGUFReader(path)
        data = open(path, "rb").read()
        GGUF_PARSE_BYTES[len(data)] = int(reader.data_offset)
        return [data]
    return [data for _, data in sequence_seeds()]


# ------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------

class Stats:
    def __init__(self, kind, runs, artifacts):
        self.kind, self.runs, self.artifacts = kind, runs, artifacts
        self.done, self.outcomes, self.findings, self.finding_kinds = 0, {}, [], {}
        self.t0 = time.perf_counter()

    def record(self, target, data):
        try:
            outcome = target(data)
        except Finding as exc:
            digest = hashlib.sha1(data).hexdigest()[:16]
            if self.artifacts:
                os.makedirs(self.artifacts, exist_ok=True)
                with open(os.path.join(self.artifacts, f"{self.kind}-{digest}"), "wb") as f:
                    f.write(data)
            cause = exc.__cause__
            where = traceback.format_exception(cause)[-2].strip() if cause else ""
            self.findings.append({"input": digest, "error": str(exc)[:300], "at": where[:300]})
            kind = f"{str(exc).split(':')[1].strip() if ':' in str(exc) else exc} @ " + \
                (where.splitlines()[0].strip() if where else "?")
            self.finding_kinds[kind] = self.finding_kinds.get(kind, 0) + 1
            outcome = "FINDING"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.done += 1

    def summary(self):
        return {"reader": self.kind, "inputs": self.done, "seconds": round(time.perf_counter() - self.t0, 1),
                "outcomes": dict(sorted(self.outcomes.items())), "findings": len(self.findings),
                "finding_kinds": self.finding_kinds, "finding_list": self.findings[:20]}

    def progress(self, every):
        if self.done % every == 0 or self.done == self.runs:
            s = self.summary()
            print(f"  {self.kind}: {self.done}/{self.runs} inputs, {s['seconds']} s, "
                  f"findings {s['findings']}, {s['outcomes']}", file=sys.stderr, flush=True)


def run_random(kind, runs, seed, artifacts=None, progress_every=0, workdir=None):
    """Fuzz reader `kind` with `runs` inputs chosen by random.Random(seed), in this process.
    Returns the summary dict."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="ruvpy-fuzz-")
    try:
        seeds = make_seeds(kind, workdir)
        target = make_target(kind, workdir)
        stats = Stats(kind, runs, artifacts)
        rng = random.Random(seed)
        try:
            pool = list(seeds)
            for i in range(runs):
                data = seeds[i] if i < len(seeds) else mutate(rng.choice(pool), rng, kind, seeds)
                if i >= len(seeds) and rng.random() < 0.1 and len(pool) < 256:
                    pool.append(data)                # mutations of mutations, a little
                stats.record(target, data)
                if progress_every:
                    stats.progress(progress_every)
        finally:
            target.close()
        return stats.summary()
    finally:
        if own:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)


def run_atheris(kind, runs, seed, artifacts, out_json, progress_every):
    """The atheris worker (one process per reader: libFuzzer exits the process at the end)."""
    import atheris
    workdir = tempfile.mkdtemp(prefix="ruvpy-fuzz-")
    with atheris.instrument_imports(include=["ruvpy", "gguf"]):
        import gguf  # noqa: F401
        import ruvpy  # noqa: F401
        import ruvpy.kvexport  # noqa: F401
        import ruvpy.models  # noqa: F401
        import ruvpy.runtime  # noqa: F401
        import ruvpy.seqfile  # noqa: F401
    seeds = make_seeds(kind, workdir)
    corpus = os.path.join(workdir, "corpus")
    os.makedirs(corpus)
    for i, data in enumerate(seeds):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(data)
    target = make_target(kind, workdir)
    stats = Stats(kind, runs, artifacts)

    def write_summary():
        with open(out_json, "w") as f:
            json.dump(stats.summary(), f)

    def one_input(data):
        stats.record(target, bytes(data))
        if progress_every:
            stats.progress(progress_every)
        if stats.done % 500 == 0 or stats.done >= runs - 1:
            write_summary()

    def custom_mutator(data, max_size, mseed):
        rng = random.Random(mseed)
        if rng.random() < 0.2:
            out = atheris.Mutate(data, max_size)
            return fix_checksum(out) if kind != "gguf" and rng.random() < 0.5 else out
        return mutate(bytes(data) or rng.choice(seeds), rng, kind, seeds)[:max_size]

    max_len = 2 * max(len(s) for s in seeds) + 4096
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={max_len}",
                   "-print_final_stats=1", corpus], one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--readers", default=",".join(READERS))
    try:
        import atheris  # noqa: F401
        default_engine = "atheris"
    except ImportError:
        default_engine = "random"
    parser.add_argument("--engine", choices=("atheris", "random"), default=default_engine)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--artifacts", default="fuzz-findings")
    parser.add_argument("--progress-every", type=int, default=5000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_atheris(args.worker, args.runs, args.seed, args.artifacts, args.worker_json,
                    args.progress_every)
        return 0
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    unknown = set(readers) - set(READERS)
    if unknown:
        parser.error(f"unknown readers {sorted(unknown)}; known: {', '.join(READERS)}")
    results = []
    for kind in readers:
        print(f"== {kind}: {args.runs} inputs ({args.engine})", file=sys.stderr, flush=True)
        if args.engine == "random":
            results.append(run_random(kind, args.runs, args.seed, args.artifacts,
                                      args.progress_every))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "summary.json")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind,
                                   "--runs", str(args.runs), "--seed", str(args.seed),
                                   "--artifacts", os.path.abspath(args.artifacts),
                                   "--progress-every", str(args.progress_every),
                                   "--worker-json", out], cwd=ROOT)
            summary = json.load(open(out)) if os.path.exists(out) else {"reader": kind, "inputs": 0}
            summary["exit_status"] = proc.returncode
            summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
            if proc.returncode not in (0,):
                summary["crashed"] = True
            results.append(summary)
    rows = [(r["reader"], r["inputs"], r.get("seconds"), r.get("findings"),
             "CRASH" if r.get("crashed") else "", json.dumps(r.get("outcomes", {}))) for r in results]
    print(f"{'reader':14} {'inputs':>8} {'seconds':>8} {'findings':>8} {'crash':>6}  outcomes")
    for row in rows:
        print(f"{row[0]:14} {row[1]:>8} {row[2]!s:>8} {row[3]!s:>8} {row[4]:>6}  {row[5]}")
    report = {"engine": args.engine, "runs_per_reader": args.runs, "seed": args.seed,
              "readers": results}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    bad = any(r.get("findings") or r.get("crashed") or r.get("inputs", 0) < args.runs
              for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
