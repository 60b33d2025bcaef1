"""A minimal GGUF reader/writer for tests that need damaged files: every key name, type, array and tensor entry is
kept as raw values, so a test can write what no well-behaved writer would (an INT32 token list, a key name that is
not UTF-8, a block count of 1000). Independent of cl3's own reader (ggml's C parser)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

# enum gguf_type
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?",
        UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


@dataclass
class KV:
    name: bytes
    type: int
    value: object          # int/float/bool, bytes for a string, a list for an array
    sub_type: int | None = None


@dataclass
class Tensor:
    name: bytes
    ne: list[int]
    type: int
    offset: int


@dataclass
class Gguf:
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    data: bytes                      # the data section (from its aligned start)
    alignment: int = 32
    n_kv_override: int | None = None       # written instead of len(kvs) (a lying count)
    n_tensors_override: int | None = None
    extra: dict = field(default_factory=dict)

    def kv(self, name: str) -> KV:
        return next(kv for kv in self.kvs if kv.name == name.encode())

    def remove(self, name: str) -> None:
        self.kvs = [kv for kv in self.kvs if kv.name != name.encode()]


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            sub, n = self.take("<I"), self.take("<Q")
            return sub, [self.value(sub) for _ in range(n)]
        return self.take(_FMT[kind])


def read(path: str | Path) -> Gguf:
    return read_bytes(Path(path).read_bytes())


def read_bytes(buf: bytes) -> Gguf:
    r = _Reader(buf)
    assert r.buf[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kvs = []
    for _ in range(n_kv):
        name, kind = r.string(), r.take("<I")
        value = r.value(kind)
        kvs.append(KV(name, kind, value[1], value[0]) if kind == ARRAY else KV(name, kind, value))
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.take("<I")
        ne = [r.take("<Q") for _ in range(n_dims)]
        tensors.append(Tensor(name, ne, r.take("<I"), r.take("<Q")))
    alignment = next((kv.value for kv in kvs if kv.name == b"general.alignment"), 32)
    start = -(-r.pos // alignment) * alignment
    return Gguf(version, kvs, tensors, r.buf[start:], alignment)


def _value(kind: int, value, sub_type: int | None = None) -> bytes:
    if kind == STRING:
        return struct.pack("<Q", len(value)) + value
    if kind == ARRAY:
        return struct.pack("<IQ", sub_type, len(value)) + b"".join(_value(sub_type, v) for v in value)
    return struct.pack(_FMT[kind], value)


def dumps(g: Gguf) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", g.version, len(g.tensors) if g.n_tensors_override is None
                                else g.n_tensors_override, len(g.kvs) if g.n_kv_override is None else g.n_kv_override)]
    for kv in g.kvs:
        out += [_value(STRING, kv.name), struct.pack("<I", kv.type), _value(kv.type, kv.value, kv.sub_type)]
    for t in g.tensors:
        out += [_value(STRING, t.name), struct.pack("<I", len(t.ne)), struct.pack(f"<{len(t.ne)}Q", *t.ne),
                struct.pack("<IQ", t.type, t.offset)]
    header = b"".join(out)
    return header + b"\0" * (-len(header) % g.alignment) + g.data


def write(g: Gguf, path: str | Path) -> Path:
    Path(path).write_bytes(dumps(g))
    return Path(path)
