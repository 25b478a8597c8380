"""The sequence-file format: a JSON header and numpy arrays in one versioned, SHA-256
checked byte string -- what Runtime.export_sequence returns and save_sequence writes.

Layout (little-endian):
  preamble   magic "RUVPYSEQ", u32 format version, u32 reserved (0), u64 header bytes,
             u64 data bytes
  header     UTF-8 JSON: {"config": storage fields, "position": int, "meta": cache meta,
             "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
  padding    zeros up to a multiple of 64 bytes from the start
  data       the arrays' raw bytes at their offsets (multiples of 64, relative to data)
  checksum   SHA-256 of every byte before it
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile

import numpy as np

__all__ = ["SequenceFileError", "FILE_MAGIC", "FILE_VERSION", "encode_sequence", "decode_sequence",
           "write_sequence_file", "read_sequence_file"]

FILE_MAGIC = b"RUVPYSEQ"
FILE_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQQ")
_DIGEST_BYTES = 32
_ALLOWED_DTYPE_KINDS = "fiub"   # plain numbers only: never objects or structured records


class SequenceFileError(ValueError):
    """A saved sequence file is corrupt, truncated, of another format version or made for a
    different configuration. Nothing was changed."""


_PLAIN_DTYPE = re.compile(r"[<>|=]?[a-z]+[0-9]*")

def _align64(n):
    return (n + 63) & ~63


def _array_dtype(a, name):
    if a.dtype.kind not in _ALLOWED_DTYPE_KINDS or a.dtype.fields is not None:
        raise TypeError(f"array {name!r} has dtype {a.dtype}; only numeric arrays can be saved")
    return a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype


def _pieces(header, arrays):
    """The byte strings of an encoded sequence before its checksum, in order (arrays are
    checked first, so nothing is produced for an unsavable one)."""
    entries, blobs, offset = [], [], 0
    for name, array in arrays.items():
        a = np.asarray(array)
        dtype = _array_dtype(a, name)
        a = np.ascontiguousarray(a, dtype=dtype)
        entries.append({"name": str(name), "dtype": dtype.str, "shape": list(a.shape),
                        "offset": offset, "nbytes": a.nbytes})
        blobs.append((offset, a))
        offset = _align64(offset + a.nbytes)
    data_bytes = offset
    header_json = json.dumps(dict(header, arrays=entries), separators=(",", ":"),
                             allow_nan=False).encode()
    data_start = _align64(_PREAMBLE.size + len(header_json))
    pieces = [_PREAMBLE.pack(FILE_MAGIC, FILE_VERSION, 0, len(header_json), data_bytes), header_json,
              bytes(data_start - _PREAMBLE.size - len(header_json))]
    written = 0
    for blob_offset, a in blobs:
        pieces.append(bytes(blob_offset - written))
        pieces.append(a.reshape(-1).view(np.uint8).data)
        written = blob_offset + a.nbytes
    pieces.append(bytes(data_bytes - written))
    return pieces


def encode_sequence(header, arrays):
    """`header` (a JSON-able dict) and `arrays` (name -> numpy array of numbers) as one
    checksummed byte string."""
    pieces = _pieces(header, arrays)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    pieces.append(digest.digest())
    return b"".join(pieces)


def write_sequence_file(path, header, arrays):
    """Write `header` and `arrays` (as encode_sequence) to `path` atomically: into a
    temporary file in the same directory, fsync'ed, then renamed over `path`, so a reader
    sees the old file or the whole new one."""
    pieces = _pieces(header, arrays)        # checks the arrays before any file exists
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                               suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            digest = hashlib.sha256()
            for piece in pieces:
                digest.update(piece)
                f.write(piece)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def decode_sequence(data, where="sequence data"):
    """(header dict, {name: array}) of a byte string from encode_sequence (any object with
    the buffer protocol; the arrays view a copy of it). Raises SequenceFileError naming the
    problem (not a sequence, other version, truncated, checksum mismatch, malformed header or
    array directory); `where` names the data in messages."""
    try:
        buffer = bytearray(data)
    except TypeError:
        raise TypeError(f"sequence data must be bytes-like, got {type(data).__name__}") from None
    size = len(buffer)
    if size < _PREAMBLE.size + _DIGEST_BYTES:
        if buffer[:len(FILE_MAGIC)] != FILE_MAGIC[:min(size, len(FILE_MAGIC))] or size == 0:
            raise SequenceFileError(f"{where}: not a ruvpy sequence file (bad magic)")
        raise SequenceFileError(f"{where}: truncated ({size} bytes, shorter than the "
                                f"{_PREAMBLE.size + _DIGEST_BYTES}-byte minimum)")
    magic, version, _, header_bytes, data_bytes = _PREAMBLE.unpack_from(buffer)
    if magic != FILE_MAGIC:
        raise SequenceFileError(f"{where}: not a ruvpy sequence file (bad magic {magic!r})")
    if version != FILE_VERSION:
        raise SequenceFileError(f"{where}: format version {version}; this ruvpy reads "
                                f"version {FILE_VERSION}")
    data_start = _align64(_PREAMBLE.size + header_bytes)
    expected = data_start + data_bytes + _DIGEST_BYTES
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        raise SequenceFileError(f"{where}: {state} ({size} bytes, the preamble says "
                                f"{expected})")
    body = memoryview(buffer)[:size - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(buffer[size - _DIGEST_BYTES:]):
        raise SequenceFileError(f"{where}: corrupt (SHA-256 checksum mismatch)")
    try:
        header = json.loads(bytes(buffer[_PREAMBLE.size:_PREAMBLE.size + header_bytes]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the interpreter's stack (a crafted header)
        raise SequenceFileError(f"{where}: malformed JSON header ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise SequenceFileError(f"{where}: the header has no array directory")
    arrays = {}
    view = memoryview(buffer)[data_start:data_start + data_bytes]
    for entry in header.pop("arrays"):
        name, array = _array_from_entry(entry, view, where)
        if name in arrays:
            raise SequenceFileError(f"{where}: array {name!r} appears twice")
        arrays[name] = array
    return header, arrays


def read_sequence_file(path):
    """(header dict, {name: array}) of a file written by write_sequence_file (errors as
    decode_sequence, naming the file)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        if f.readinto(buffer) != size:
            raise SequenceFileError(f"{path}: could not read all {size} bytes")
    return decode_sequence(buffer, path)


def _entry_int(value):
    """A JSON number that must be an exact int (not a float such as 2.5, Infinity or NaN,
    not a bool)."""
    if type(value) is not int:
        raise TypeError(f"{value!r} is not an integer")
    return value


def _array_from_entry(entry, data, where):
    def described():
        try:
            text = repr(entry)
        except RecursionError:
            return "(nested too deep to print)"
        return text if len(text) <= 200 else text[:200] + "..."
    try:
        if not isinstance(entry, dict):
            raise TypeError("not an object")
        name, dtype_text = entry["name"], entry["dtype"]
        if not isinstance(dtype_text, str):
            raise TypeError("the dtype must be a string")
        if not _PLAIN_DTYPE.fullmatch(dtype_text):
            # numpy parses comma and repeat forms with ast (SyntaxError on junk): refuse them first
            raise ValueError("the dtype must be a plain numeric dtype such as '<f2'")
        dtype = np.dtype(dtype_text)
        if not isinstance(entry["shape"], list):
            raise TypeError("the shape must be a list")
        shape = tuple(_entry_int(s) for s in entry["shape"])
        offset, nbytes = _entry_int(entry["offset"]), _entry_int(entry["nbytes"])
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise SequenceFileError(f"{where}: malformed array entry {described()} "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(name, str) or dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.fields \
            or dtype.subdtype is not None:
        raise SequenceFileError(f"{where}: array entry {described()} has a bad name or dtype")
    if any(s < 0 for s in shape) or math.prod(shape) * dtype.itemsize != nbytes:
        raise SequenceFileError(f"{where}: array {name!r}: shape {list(shape)[:8]} of {dtype} "
                                f"does not make {nbytes} bytes")
    if offset < 0 or offset % 64 or offset + nbytes > len(data):
        raise SequenceFileError(f"{where}: array {name!r} lies outside the data section "
                                f"(offset {offset}, {nbytes} bytes of {len(data)})")
    array = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
    try:
        return name, array.reshape(shape)
    except ValueError as exc:      # e.g. more dimensions than numpy allows
        raise SequenceFileError(f"{where}: array {name!r}: shape {list(shape)}: {exc}") from None
