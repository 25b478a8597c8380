"""A short pass of tools/fuzz.py over every file reader ruvpy owns (the 100,000-input runs are
`python tools/fuzz.py`): sequence files (Runtime.load_sequence), exported sequences
(Runtime.import_sequence) and GGUF files (ruvpy.models.load), each over mutated real files.
Every input must load (and then be usable) or raise a documented exception, and a failed load
must change nothing. Plus the findings of the fuzzer, each as a test of its own."""
import json
import os
import sys

import numpy as np
import pytest

from _helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import fuzz  # noqa: E402

# inputs per reader: a few seconds each; the mutations are seeded, so the pass is reproducible
SHORT_PASS = {"sequence-file": 1500, "export-bytes": 1500, "gguf": 300}

def _findings(summary):
    return summary["finding_list"]


@pytest.mark.parametrize("reader", list(SHORT_PASS))
def test_short_fuzz_pass(reader, tmp_path):
    summary = fuzz.run_random(reader, SHORT_PASS[reader], seed=7, workdir=str(tmp_path),
                              artifacts=str(tmp_path / "findings"))
    assert summary["inputs"] == SHORT_PASS[reader]
    assert summary["findings"] == 0, json.dumps(_findings(summary), indent=1)
    # the pass went deep: some inputs were refused, some loaded and were used
    assert summary["outcomes"].get("loaded", 0) > 0, summary["outcomes"]
    refused = sum(v for k, v in summary["outcomes"].items() if k not in ("loaded", "FINDING"))
    assert refused > 0, summary["outcomes"]


def test_mutations_reach_past_the_checksum():
    """Most structure-aware mutations decode (valid checksum), and nesting is spliced in."""
    import random
    from ruvpy.seqfile import SequenceFileError, decode_sequence
    seed = fuzz.encode_raw(json.dumps({"arrays": [], "x": [1, 2]}).encode(), b"")
    decoded = deep = 0
    for i in range(400):
        data = fuzz.mutate_structure(seed, random.Random(i))
        deep += b"[[[[[[" in data
        try:
            decode_sequence(data)
            decoded += 1
        except SequenceFileError as exc:
            assert "checksum" not in str(exc) and "truncated" not in str(exc), exc
    assert decoded > 100 and deep > 0


# -- findings of tools/fuzz.py --------------------------------------------------------------

def test_a_shape_of_more_dimensions_than_numpy_allows_is_a_sequence_file_error():
    """Found by the fuzzer: a 65-dimensional shape made numpy's reshape raise a bare
    ValueError out of decode_sequence."""
    from ruvpy.seqfile import SequenceFileError, decode_sequence
    header = {"arrays": [{"name": "a", "dtype": "<f4", "shape": [1] * 65, "offset": 0,
                          "nbytes": 4}]}
    data = fuzz.encode_raw(json.dumps(header).encode(), bytes(64))
    with pytest.raises(SequenceFileError, match="shape"):
        decode_sequence(data)


def test_a_malformed_gguf_file_is_a_value_error(tmp_path):
    """Found by the fuzzer: a string length or count past the end of the file made gguf's
    reader raise IndexError out of ruvpy.models.load (documented: ValueError)."""
    from ruvpy import models
    path = fuzz.gguf_seed(tmp_path / "seed.gguf")
    data = bytearray(path.read_bytes())
    # the first metadata key's length (after magic, version, tensor and kv counts): huge
    data[24:32] = (2**40).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        models.load(bad)
    with np.errstate(all="ignore"), models.load(path, max_tokens=16) as model:   # the seed loads
        assert model.forward(model.new_sequence(), [1, 2]).shape == (2, model.config.vocab_size)


def test_merges_naming_tokens_outside_the_vocabulary_are_a_value_error():
    """Found by the fuzzer: a merge whose halves are not in the vocabulary made `tokenizers`
    raise a bare Exception out of ruvpy.models.load (documented: ValueError)."""
    from ruvpy.models.gguf_loader import TokenizerData
    from ruvpy.models.tokenizer import GGUFTokenizer
    data = TokenizerData(model="gpt2", pre="smollm", tokens=["a", "b", "ab"],
                         token_types=np.ones(3, np.int32), merges=["a b", "a zz"])
    with pytest.raises(ValueError, match="BPE tables are malformed"):
        GGUFTokenizer(data)
    good = TokenizerData(model="gpt2", pre="smollm", tokens=["a", "b", "ab"],
                         token_types=np.ones(3, np.int32), merges=["a b"])
    assert GGUFTokenizer(good).vocab_size == 3


def test_a_count_past_the_end_of_a_gguf_file_is_refused_without_reading_it(tmp_path):
    """Found by the fuzzer: an array of 2**40 values declared in a tiny GGUF file made gguf's
    reader loop and allocate until the machine ran out of memory (22 GB RSS). load() must
    refuse it from the file's size. Run in a child process whose memory is capped, so the old
    behaviour fails as MemoryError instead of taking the machine: its address space, or under
    the sanitizers (ASan reserves terabytes of address space for its shadow, no RLIMIT_AS fits)
    ASan's own cap, soft_rss_limit_mb (mallocs return NULL beyond it: MemoryError)."""
    import struct
    import subprocess
    import textwrap
    sanitized = os.environ.get("RUVPY_SANITIZED") == "1"
    cap = "" if sanitized else "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"
    env = dict(os.environ)
    if sanitized:
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":soft_rss_limit_mb=3072"
    bad = tmp_path / "count.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
                    + struct.pack("<IIQ", 9, 0, 2**40) + bytes(16))
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r})
        {cap}
        from ruvpy import models
        try:
            models.load({str(bad)!r})
        except ValueError as exc:
            print("ValueError:", exc)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # ruvpy's reader (ruvpy/_gguf) names the entry whose elements run past the file's end
    assert "ValueError:" in proc.stdout and "holds 1099511627776 elements" in proc.stdout, proc.stdout
