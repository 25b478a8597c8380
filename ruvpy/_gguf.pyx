# cython: language_level=3
"""GGUF files, memory-mapped and read in place (csrc/gguf/rv_gguf.c).

    f = GGUFFile(path)            # maps and indexes the file; ValueError/OSError if it cannot
    f.get("llama.block_count")    # metadata values (str, int, float, bool, list of str,
                                  #   numpy arrays of numbers)
    f.tensor("blk.0.attn_q.weight")   # TensorInfo(name, type, type_name, shape, offset, nbytes)
    f.tensor_bytes(name)          # read-only uint8 view of the tensor's bytes in the mapping
    f.resident_bytes()            # how much of the tensor data is in RAM now (mincore)
    f.close()                     # unmaps (once no array over the mapping is alive)

Arrays over the mapping hold a buffer export of the file object: the mapping stays until the
last of them is gone, whatever close() was called, so no Python code can reach unmapped memory.
"""
import os
from collections import namedtuple

import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyBUF_WRITABLE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.string cimport memcpy
from ruvpy._common cimport RV_OK, RV_ENOMEM, RV_EINVAL

cnp.import_array()



TensorInfo = namedtuple("TensorInfo", "name type type_name shape offset nbytes")
TensorInfo.__doc__ = """A tensor of a GGUF file: ggml type id and name, shape in ggml order
(ne0, the contiguous axis, first), offset into the data section, bytes (0 if the type is one
ruvpy does not know)."""

_NUMPY_OF = {RV_GGUF_U8: np.uint8, RV_GGUF_I8: np.int8, RV_GGUF_U16: np.uint16,
             RV_GGUF_I16: np.int16, RV_GGUF_U32: np.uint32, RV_GGUF_I32: np.int32,
             RV_GGUF_F32: np.float32, RV_GGUF_BOOL: np.bool_, RV_GGUF_U64: np.uint64,
             RV_GGUF_I64: np.int64, RV_GGUF_F64: np.float64}


def type_name(uint32_t type):
    """ggml's name of a type id ("Q4_K"), or "type <id>" for an unknown one."""
    cdef const char *name = rv_ggml_type_name(type)
    return name.decode() if name != NULL else f"type {type}"


def type_block(uint32_t type):
    """(values, bytes) per block of a ggml type id, or None if unknown."""
    cdef uint64_t values, nbytes
    if not rv_ggml_type_block(type, &values, &nbytes):
        return None
    return int(values), int(nbytes)


cdef str _text(const char *p, uint64_t n):
    return PyUnicode_DecodeUTF8(p, <Py_ssize_t>n, "replace")


cdef str _key_text(const char *p, uint64_t n):
    """A metadata key as text that encodes back to its exact bytes (_find): invalid UTF-8
    becomes lone surrogates, not U+FFFD (under which get() could not find the key keys() named)"""
    return PyUnicode_DecodeUTF8(p, <Py_ssize_t>n, "surrogateescape")


cdef class GGUFFile:
    """GGUFFile(path, *, populate=False): a GGUF file mapped read-only and indexed in place.
    populate=True reads the whole file in at open (MAP_POPULATE). A missing file raises
    FileNotFoundError; a file that is not GGUF, truncated or corrupt raises ValueError saying
    what is wrong (and nothing stays mapped)."""

    cdef rv_gguf g
    cdef bint mapped
    cdef bint close_pending
    cdef Py_ssize_t exports
    cdef readonly str path
    cdef dict _index

    def __cinit__(self, path, *, populate=False):
        self.mapped = False
        self.path = os.fspath(path)
        cdef bytes bpath = os.fsencode(self.path)
        cdef const char *cpath = bpath
        cdef int pop = 1 if populate else 0, rc
        with nogil:
            rc = rv_gguf_open(&self.g, cpath, pop)
        if rc == RV_EIO:
            err = self.g.sys_errno
            raise OSError(err, f"{self.path}: {self.g.error.decode(errors='replace')}", self.path) \
                if err not in (2,) else FileNotFoundError(err, os.strerror(err), self.path)
        if rc == RV_ENOMEM:
            raise MemoryError(f"{self.path}: {self.g.error.decode(errors='replace')}")
        if rc != RV_OK:
            raise ValueError(f"{self.path!r} is not a readable GGUF file: "
                             f"{self.g.error.decode(errors='replace')}")
        self.mapped = True
        self._index = {}
        cdef uint64_t i
        for i in range(self.g.n_tensors):
            name = _text(self.g.tensors[i].name, self.g.tensors[i].name_len)
            if name in self._index:
                self._unmap()
                raise ValueError(f"{self.path!r} is not a readable GGUF file: tensor {name!r} "
                                 f"appears twice")
            self._index[name] = i

    def __dealloc__(self):
        if self.mapped:
            rv_gguf_close(&self.g)
            self.mapped = False

    cdef _unmap(self):
        if self.mapped:
            rv_gguf_close(&self.g)
            self.mapped = False

    cdef _check(self):
        if not self.mapped or self.close_pending:
            raise ValueError(f"GGUF file {self.path!r} is closed")

    # -- the buffer protocol: the whole mapping, read-only --
    def __getbuffer__(self, Py_buffer *view, int flags):
        self._check()
        if flags & PyBUF_WRITABLE:
            raise BufferError("a GGUF mapping is read-only")
        view.buf = self.g.map
        view.obj = self
        view.len = self.g.size
        view.readonly = 1
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = <Py_ssize_t *>&view.len
        view.strides = &view.itemsize
        view.suboffsets = NULL
        view.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1
        if self.exports == 0 and self.close_pending:
            self._unmap()

    def close(self):
        """Unmap the file now, or -- while arrays over it are alive -- as soon as the last of
        them is gone. Further use of this object raises ValueError. Idempotent."""
        if not self.mapped:
            return
        self.close_pending = True
        if self.exports == 0:
            self._unmap()

    @property
    def closed(self):
        return not self.mapped or self.close_pending

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what the file holds --
    @property
    def size(self):
        """Bytes mapped (the whole file)."""
        return self.g.size if self.mapped else 0

    @property
    def version(self):
        return self.g.version

    @property
    def alignment(self):
        return self.g.alignment

    @property
    def data_offset(self):
        return self.g.data_offset

    def keys(self):
        self._check()
        return [_key_text(self.g.kv[i].key, self.g.kv[i].key_len) for i in range(self.g.n_kv)]

    cdef const rv_gguf_kv *_find(self, str key):
        cdef bytes k = key.encode("utf-8", "surrogateescape")
        cdef uint64_t i
        for i in range(self.g.n_kv):
            if self.g.kv[i].key_len == <uint64_t>len(k) and self.g.kv[i].key[:len(k)] == k:
                return &self.g.kv[i]
        return NULL

    def get(self, str key, default=None):
        """The metadata value of `key`: str, int, float, bool; arrays of strings as a list of
        str, arrays of numbers as a numpy array; `default` when absent."""
        self._check()
        cdef const rv_gguf_kv *kv = self._find(key)
        if kv == NULL:
            return default
        if kv.type == RV_GGUF_ARRAY:
            if kv.elem_type == RV_GGUF_STRING:
                return self._strings(kv)
            return np.frombuffer(self, dtype=_NUMPY_OF[kv.elem_type], count=<Py_ssize_t>kv.count,
                                 offset=<Py_ssize_t>(kv.value - <const uint8_t *>self.g.map)).copy()
        return self._scalar(kv.type, kv.value)

    def length(self, str key):
        """Elements of the array value of `key` (1 for a scalar); None when absent."""
        self._check()
        cdef const rv_gguf_kv *kv = self._find(key)
        return None if kv == NULL else int(kv.count)

    cdef object _scalar(self, uint32_t t, const uint8_t *p):
        cdef uint64_t n
        if t == RV_GGUF_STRING:
            memcpy(&n, p, 8)
            return _text(<const char *>p + 8, n)
        return np.frombuffer(self, dtype=_NUMPY_OF[t], count=1,
                             offset=<Py_ssize_t>(p - <const uint8_t *>self.g.map))[0].item()

    cdef list _strings(self, const rv_gguf_kv *kv):
        cdef list out = []
        cdef const uint8_t *p = kv.value
        cdef uint64_t n, i
        for i in range(kv.count):
            memcpy(&n, p, 8)
            out.append(_text(<const char *>p + 8, n))
            p += 8 + n
        return out

    @property
    def tensor_names(self):
        self._check()
        return list(self._index)

    def __contains__(self, name):
        return self.mapped and name in self._index

    def tensor(self, str name):
        """TensorInfo of `name`; KeyError if the file has no such tensor."""
        self._check()
        cdef uint64_t i = self._index[name]
        cdef const rv_gguf_tensor *t = &self.g.tensors[i]
        return TensorInfo(name, int(t.type), type_name(t.type),
                          tuple(int(t.dims[d]) for d in range(t.n_dims)), int(t.offset),
                          int(t.nbytes))

    def tensors(self):
        return [self.tensor(name) for name in self._index]

    def tensor_bytes(self, str name):
        """A read-only uint8 view of the tensor's bytes in the mapping (no copy); ValueError
        for a tensor of a type whose size ruvpy does not know."""
        self._check()
        cdef const rv_gguf_tensor *t = &self.g.tensors[<uint64_t>self._index[name]]
        if t.data == NULL:
            raise ValueError(f"tensor {name!r} has type {type_name(t.type)}, whose block size "
                             f"ruvpy does not know")
        return np.frombuffer(self, dtype=np.uint8, count=<Py_ssize_t>t.nbytes,
                             offset=<Py_ssize_t>(t.data - <const uint8_t *>self.g.map))

    def resident_bytes(self):
        """Bytes of the tensor data section resident in RAM now (mincore)."""
        self._check()
        if self.g.data_offset >= self.g.size:
            return 0
        return int(rv_gguf_resident_bytes(&self.g, <const uint8_t *>self.g.map + self.g.data_offset,
                                          self.g.size - self.g.data_offset))

    @property
    def data_bytes(self):
        """Bytes of the tensor data section."""
        return max(0, <int64_t>self.g.size - <int64_t>self.g.data_offset) if self.mapped else 0

    def __repr__(self):
        state = "closed" if self.closed else f"{self.g.n_tensors} tensors, {self.g.size} bytes mapped"
        return f"<GGUFFile {self.path!r}: {state}>"
