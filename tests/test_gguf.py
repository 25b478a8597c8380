"""GGUF files used in place: ruvpy's reader (ruvpy._gguf) against gguf-py, tiny random Llama
models of every supported block format against a float64 reference, files that cannot be run
(unsupported type, truncated, missing tensor, other architecture, corrupt) failing cleanly with
the mapping closed again, and what the Runtime reports about the weights."""
import gc
import os
import tracemalloc

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import qblocks  # noqa: E402
import tiny_llama as tl  # noqa: E402
import ruvpy.models as models  # noqa: E402
from ruvpy import _gguf, _kernels  # noqa: E402
from ruvpy._linear import SUPPORTED_TYPES  # noqa: E402


def _mapped(path):
    """Whether `path` is memory-mapped into this process now."""
    with open("/proc/self/maps") as f:
        return os.path.realpath(path) in f.read()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """{weight type: (path, dequantized values)} of tiny models, one per supported format."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    files = {}
    for i, name in enumerate(qblocks.ALL_TYPES):
        path = root / f"tiny-{name}.gguf"
        files[name] = (path, tl.write_tiny_llama(path, name, seed=i))
    return files


# -- the reader -------------------------------------------------------------------------------
def test_type_table_matches_gguf_py():
    from gguf.constants import GGML_QUANT_SIZES
    for t, (values, nbytes) in GGML_QUANT_SIZES.items():
        assert _gguf.type_block(int(t)) == (values, nbytes), t.name
        assert _gguf.type_name(int(t)) == t.name
    assert _gguf.type_block(4) is None and _gguf.type_name(4) == "type 4"   # removed Q4_2


def test_reader_agrees_with_gguf_py(tiny_files):
    path, _ = tiny_files["Q4_K"]
    theirs = gguf.GGUFReader(str(path))
    with _gguf.GGUFFile(path) as ours:
        assert ours.version == 3 and ours.alignment == 32
        assert sorted(ours.keys()) == sorted(k for k in theirs.fields if not k.startswith("GGUF."))
        for key, field in theirs.fields.items():
            if key.startswith("GGUF."):
                continue
            want, got = field.contents(), ours.get(key)
            if isinstance(got, np.ndarray):
                got = got.tolist()
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
        assert ours.tensor_names == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            info = ours.tensor(t.name)
            assert info.type == int(t.tensor_type) and info.shape == tuple(int(s) for s in t.shape)
            assert info.nbytes == t.n_bytes
            data = ours.tensor_bytes(t.name)
            assert not data.flags.writeable
            assert np.array_equal(data, np.asarray(t.data).reshape(-1).view(np.uint8))


def test_arrays_keep_the_mapping_alive(tiny_files):
    path, _ = tiny_files["Q8_0"]
    f = _gguf.GGUFFile(path)
    data = f.tensor_bytes("token_embd.weight")
    expected = data.copy()
    f.close()
    assert f.closed and _mapped(path)                 # an array still reads the mapping
    assert np.array_equal(data, expected)
    with pytest.raises(ValueError, match="closed"):
        f.tensor_bytes("token_embd.weight")
    del data
    assert not _mapped(path)                          # the last array gone: unmapped


def test_bad_files_fail_cleanly(tmp_path, tiny_files):
    good = tiny_files["Q4_0"][0].read_bytes()
    cases = {"empty": b"", "garbage": b"not a GGUF file" * 8, "magic only": b"GGUF",
             "bad version": b"GGUF" + (7).to_bytes(4, "little") + bytes(16)}
    header_end = good.index(b"tokenizer.ggml.model")
    for cut in (8, 20, header_end, len(good) // 2, len(good) - 1):
        cases[f"truncated at {cut}"] = good[:cut]
    for label, blob in cases.items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(blob)
        with pytest.raises(ValueError, match="not a readable GGUF file") as info:
            _gguf.GGUFFile(path)
        if label.startswith("truncated at") and int(label.split()[-1]) > 24:
            assert "truncated" in str(info.value), label
        assert not _mapped(path), label
    with pytest.raises(FileNotFoundError):
        _gguf.GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(OSError):
        _gguf.GGUFFile(tmp_path)                      # a directory


def test_corrupted_bytes_never_crash(tmp_path, tiny_files):
    """Random byte flips in the header region: the reader raises ValueError or opens a file
    whose every tensor lies inside it -- never a crash or a read past the mapping."""
    good = bytearray(tiny_files["Q4_1"][0].read_bytes())
    with _gguf.GGUFFile(tiny_files["Q4_1"][0]) as f:
        header = f.data_offset
    rng = np.random.default_rng(7)
    path = tmp_path / "flipped.gguf"
    opened = 0
    for _ in range(300):
        blob = bytearray(good)
        for at in rng.integers(0, header, rng.integers(1, 4)):
            blob[at] = rng.integers(0, 256)
        path.write_bytes(bytes(blob))
        try:
            f = _gguf.GGUFFile(path)
        except ValueError:
            continue
        opened += 1
        for info in f.tensors():
            if info.nbytes:
                assert f.data_offset + info.offset + info.nbytes <= f.size
                f.tensor_bytes(info.name).sum()
            [f.get(k) for k in f.keys()]
        f.close()
    assert opened > 0


# -- loading models ---------------------------------------------------------------------------
def test_unsupported_type_names_the_type_and_the_tensor(tmp_path):
    path = tmp_path / "q5_0.gguf"
    blocks = np.random.default_rng(0).integers(0, 256, (tl.HEADS * tl.HEAD_DIM, tl.HIDDEN // 32 * 22),
                                               dtype=np.uint8)
    tl.write_tiny_llama(path, "Q4_0", override={"blk.1.attn_q.weight": (blocks, gguf.GGMLQuantizationType.Q5_0)})
    with pytest.raises(ValueError, match=r"'blk\.1\.attn_q\.weight' has type Q5_0.*supported: "
                                         + ", ".join(SUPPORTED_TYPES)):
        models.load(path)
    assert not _mapped(path)


def test_missing_tensor_and_other_architectures(tmp_path):
    path = tmp_path / "missing.gguf"
    tl.write_tiny_llama(path, "Q8_0", skip=("blk.1.ffn_down.weight",))
    with pytest.raises(ValueError, match=r"lacks the tensor 'blk\.1\.ffn_down\.weight'"):
        models.load(path)
    assert not _mapped(path)
    path = tmp_path / "gpt2.gguf"
    tl.write_tiny_llama(path, "Q8_0", arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        models.load(path)
    assert not _mapped(path)
    path = tmp_path / "shape.gguf"
    tl.write_tiny_llama(path, "Q8_0", metadata={"llama.feed_forward_length": 256})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_gate\.weight' has shape \[512, 256\], "
                                         r"expected \[256, 256\]"):
        models.load(path)
    assert not _mapped(path)


@pytest.mark.parametrize("weight_type", qblocks.ALL_TYPES)
def test_tiny_model_matches_float64_reference(tiny_files, weight_type, isa):
    """Every block format end to end (embedding lookup, RMSNorm, the block matmuls, RoPE,
    attention through the Runtime, SwiGLU, residuals, tied Q8_0 LM head) against float64 numpy
    over gguf-py's dequantization, with the activations quantized at the same points. What
    remains is float32 rounding, which can flip an int8 activation code by one step; the flips
    grow through the layers. Perturbing every matmul input of the float64 reference itself by
    one float32 ulp moves its logits by up to 5.2e-3 of their scale (these files, Q8_0/Q4_0);
    ruvpy measured up to 8e-3. Bound: 2e-2, and greedy tokens equal except at near-ties. A
    structural error (RoPE pairing, a norm gain, a residual) is off by O(1) of the scale."""
    path, values = tiny_files[weight_type]
    ids = [3, 17, 42, 5, 60, 11, 0, 29]
    ref = tl.reference_logits(values, ids, weight_type)
    with models.load(path, max_tokens=64) as model:
        assert model.weights.types() == {weight_type: 14, "Q8_0": 1} if weight_type != "Q8_0" else {"Q8_0": 15}
        prefill = model.forward(model.new_sequence(), ids)
        seq = model.new_sequence()
        stepwise = np.concatenate([model.forward(seq, [t]) for t in ids])
    scale = np.abs(ref).max()
    top2 = np.sort(ref, axis=1)[:, -2:]
    for got in (prefill, stepwise):
        error = np.abs(got - ref).max()
        assert error <= 2e-2 * scale
        differs = got.argmax(1) != ref.argmax(1)
        assert (top2[differs, 1] - top2[differs, 0] <= 2 * error).all()


def test_weights_are_used_in_place_and_reported(tiny_files):
    path, _ = tiny_files["Q6_K"]
    with models.load(path, max_tokens=64) as model:
        w = model.weights
        mapping = np.frombuffer(w.file, np.uint8)
        for layer in w.layers:
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                assert np.shares_memory(layer[name].data, mapping)     # no copy
        assert np.shares_memory(w.output_norm, mapping) and w.output is w.embedding
        del mapping
        model.forward(model.new_sequence(), [1, 2, 3])
        stats = model.runtime.stats()
        assert stats.weights["mapped_bytes"] == os.path.getsize(path)
        assert stats.weights["nbytes"] == w.nbytes <= stats.weights["mapped_bytes"]
        assert 0 < stats.weights["resident_bytes"] <= w.file.data_bytes
        assert "weights" in stats.format() and "mapped" in stats.format()
    w.close()                      # deferred: the model's matrices still read the mapping
    assert _mapped(path)
    del model, w, layer
    gc.collect()
    assert not _mapped(path)


def test_decode_step_allocates_nothing_but_the_logits(tiny_files):
    """After warm-up a decode step's activations all come from the step arena: what Python's
    allocator sees at its peak is the returned logits and a few small objects (the Step, the
    positions array, ndarray headers over arena memory)."""
    path, _ = tiny_files["Q4_1"]
    with models.load(path, max_tokens=64) as model:
        seq = model.new_sequence()
        model.forward_last(seq, [1, 2, 3])
        for t in range(3):
            model.forward_last(seq, [t])
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            tracemalloc.reset_peak()
            logits = model.forward_last(seq, [7])
            _, peak = tracemalloc.get_traced_memory()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert logits.nbytes == 4 * tl.VOCAB
        print(f"\ndecode step: peak {peak} B traced (logits {logits.nbytes} B), net {growth} B")
        assert peak <= logits.nbytes + 16 * 1024
        assert model.runtime.stats().arena_fallbacks == 0


def test_threads_give_identical_logits(tiny_files):
    path, _ = tiny_files["Q4_K"]
    before = _kernels.get_num_threads()
    out = []
    try:
        with models.load(path, max_tokens=128) as model:
            for threads in (1, 2):
                _kernels.set_num_threads(threads)
                out.append(model.forward(model.new_sequence(), list(range(40))))
    finally:
        _kernels.set_num_threads(before)
    assert np.array_equal(out[0], out[1])


def test_a_key_that_is_not_utf8_is_found_by_the_name_keys_gives(tmp_path):
    """keys() decoded a metadata key's invalid UTF-8 bytes to U+FFFD, under which get() and
    length() then found nothing; the name keys() gives now encodes back to the exact bytes."""
    import struct
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", 4, 7)
    path = tmp_path / "badkey.gguf"
    path.write_bytes(data + b"\0" * (-len(data) % 32))
    with _gguf.GGUFFile(str(path)) as f:
        (key,) = f.keys()
        assert key.encode("utf-8", "surrogateescape") == b"\xff\xfe"
        assert f.get(key) == 7 and f.length(key) == 1
