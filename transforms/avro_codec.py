"""Avro files written with an encoder specialised to their schema; fastavro's bytes, at a third of its cost.

fastavro's writer walks the schema for every record and resolves each `["null", T]` union by testing the
value against each branch: ~12 µs per clean event (31 fields), the largest single cost of the batch job
after parsing (benchmarks/RESULTS.md). `compile_encoder` turns a schema into one Python function with
the walk unrolled (~4.6 µs per clean event). Why not a library: fastavro is the library, and stays the
reference: the compiled function takes only values of the exact types it knows (str, int in 64 bits,
float, bool, list, dict) and hands anything else to fastavro (a datetime for a timestamp, a bool where an
int is declared, a tuple for an array, a missing field with a default), so a file holds the bytes
fastavro would write, or fails with fastavro's error (tests/test_avro_codec.py checks both on random
records). A schema using types it does not compile (enum, fixed, bytes, float, unions of two non-null
types, named-type references) is written by fastavro whole. cavro (a Cython encoder, 6.8 µs per clean
event, byte-identical) was measured too: slower than this and one more dependency.

`AvroFileWriter` writes the object container the way fastavro's `Writer` does: its header, blocks of
about 16,000 bytes (fastavro's sync interval), deflate as raw zlib data, so the same records and sync
marker give the same file.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable

import fastavro

_SYNC_INTERVAL = 16_000  # fastavro's Writer default (1000 * SYNC_SIZE): same block boundaries
_INT64 = (-(1 << 63), 1 << 63)
_ONE_BYTE = tuple(bytes([i]) for i in range(128))


class _Unsupported(Exception):
    """A schema part the encoder does not compile (fastavro writes the whole schema)."""


class _Fallback(Exception):
    """A value the compiled encoder does not take as its exact type (fastavro encodes the record)."""


def zigzag_varint(n: int) -> bytes:
    """Avro's `long` encoding of an int in 64 bits (_Fallback outside: fastavro decides those)."""
    if 0 <= n < 64:
        return _ONE_BYTE[n << 1]
    if not _INT64[0] <= n < _INT64[1]:
        raise _Fallback
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_PACK_DOUBLE = struct.Struct("<d").pack


class _Source:
    """Lines of the generated function, with fresh local names."""

    def __init__(self):
        self.lines: list[str] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def add(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


def _base_type(schema):
    """A type without its logical type: `{"type": "long", "logicalType": ...}` is a long for the encoder
    only when the value is an int (a datetime fails the int test and goes to fastavro)."""
    if isinstance(schema, dict) and schema.get("type") in ("int", "long", "string", "double", "boolean", "null"):
        return schema["type"]
    return schema


def _emit_value(src: _Source, indent: int, value: str, schema) -> None:
    """Code writing `value` (a local name) as `schema`, raising _Fallback on any other type."""
    t = _base_type(schema)
    if t == "string":
        b, n = src.name("b"), src.name("n")
        src.add(indent, f"if type({value}) is not str: raise _Fallback")
        src.add(indent, f"{b} = {value}.encode()")
        src.add(indent, f"{n} = len({b})")
        # Most strings are shorter than 64 bytes: their length is one byte, looked up without a call.
        src.add(indent, f"a(one_byte[{n} << 1] if {n} < 64 else zz({n})); a({b})")
    elif t in ("int", "long"):
        src.add(indent, f"if type({value}) is not int: raise _Fallback")
        if t == "int":  # fastavro checks the 32-bit range where a union is resolved: it decides outside it
            src.add(indent, f"if not -2147483648 <= {value} < 2147483648: raise _Fallback")
        src.add(indent, f"a(one_byte[{value} << 1] if 0 <= {value} < 64 else zz({value}))")
    elif t == "double":
        src.add(indent, f"if type({value}) is not float: raise _Fallback")
        src.add(indent, f"a(pack_double({value}))")
    elif t == "boolean":
        src.add(indent, f'if {value} is True: a(b"\\x01")')
        src.add(indent, f'elif {value} is False: a(b"\\x00")')
        src.add(indent, "else: raise _Fallback")
    elif t == "null":
        src.add(indent, f"if {value} is not None: raise _Fallback")
    elif isinstance(t, list):
        _emit_union(src, indent, value, t)
    elif isinstance(t, dict) and t.get("type") == "array":
        item = src.name("item")
        src.add(indent, f"if type({value}) is not list: raise _Fallback")
        src.add(indent, f"if {value}:")
        src.add(indent + 1, f"a(zz(len({value})))")
        src.add(indent + 1, f"for {item} in {value}:")
        _emit_value(src, indent + 2, item, t["items"])
        src.add(indent, 'a(b"\\x00")')
    elif isinstance(t, dict) and t.get("type") == "map":
        k, v = src.name("k"), src.name("v")
        src.add(indent, f"if type({value}) is not dict: raise _Fallback")
        src.add(indent, f"if {value}:")
        src.add(indent + 1, f"a(zz(len({value})))")
        src.add(indent + 1, f"for {k}, {v} in {value}.items():")
        _emit_value(src, indent + 2, k, "string")
        _emit_value(src, indent + 2, v, t["values"])
        src.add(indent, 'a(b"\\x00")')
    elif isinstance(t, dict) and t.get("type") == "record":
        _emit_record(src, indent, value, t)
    else:
        raise _Unsupported(repr(t)[:80])


def _emit_union(src: _Source, indent: int, value: str, branches: list) -> None:
    """`["null", T]` or `[T, "null"]`; other unions are not compiled."""
    if len(branches) != 2 or "null" not in branches or branches[0] == branches[1]:
        raise _Unsupported(f"union {branches!r}"[:80])
    null_index = branches.index("null")
    other = branches[1 - null_index]
    src.add(indent, f"if {value} is None: a({_ONE_BYTE[null_index << 1]!r})")
    src.add(indent, "else:")
    src.add(indent + 1, f"a({_ONE_BYTE[(1 - null_index) << 1]!r})")
    if isinstance(other, dict) and other.get("type") == "record":
        # A "-type" key names the union branch for fastavro: it decides.
        src.add(indent + 1, f'if "-type" in {value}: raise _Fallback')
    _emit_value(src, indent + 1, value, other)


def _emit_record(src: _Source, indent: int, value: str, schema: dict) -> None:
    src.add(indent, f"if type({value}) is not dict: raise _Fallback")
    for field in schema["fields"]:
        v = src.name("v")
        name = field["name"]
        if field.get("default") is not None:  # fastavro writes the default for a missing key: let it
            src.add(indent, f"if {name!r} not in {value}: raise _Fallback")
        # A missing key reads as None: written as null where the type allows it (fastavro too), else
        # the type test fails and fastavro raises its error.
        src.add(indent, f"{v} = {value}.get({name!r})")
        _emit_value(src, indent, v, field["type"])


def compile_encoder(schema: dict) -> Callable[[dict], bytes] | None:
    """A record -> its Avro binary encoding under `schema`, raising _Fallback for values to hand to
    fastavro; None when the schema uses a type the encoder does not compile."""
    src = _Source()
    src.add(0, "def encode(r):")
    src.add(1, "out = []")
    src.add(1, "a = out.append")
    try:
        _emit_record(src, 1, "r", schema)
    except (_Unsupported, RecursionError):
        return None
    src.add(1, 'return b"".join(out)')
    namespace = {"zz": zigzag_varint, "one_byte": _ONE_BYTE, "pack_double": _PACK_DOUBLE, "_Fallback": _Fallback}
    try:
        code = compile("\n".join(src.lines), f"<avro encoder {schema.get('name', '')}>", "exec")
    except (SyntaxError, RecursionError, MemoryError):  # nested deeper than Python compiles: fastavro's
        return None
    exec(code, namespace)  # noqa: S102
    return namespace["encode"]


class AvroRecordEncoder:
    """`encode(record) -> bytes`: the compiled encoder, fastavro for whatever it hands back."""

    def __init__(self, schema: dict):
        self.parsed_schema = fastavro.parse_schema(schema)
        self._compiled = compile_encoder(schema)

    def _fastavro(self, record) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.parsed_schema, record)
        return buf.getvalue()

    def encode(self, record) -> bytes:
        if self._compiled is not None:
            try:
                return self._compiled(record)
            except (_Fallback, AttributeError, TypeError, UnicodeEncodeError):
                pass  # fastavro encodes it, or raises its own error
        return self._fastavro(record)


class AvroFileWriter:
    """An Avro object container file on `fh`, written as fastavro's `Writer` writes it (header, then
    blocks of ~16,000 uncompressed bytes, each followed by the sync marker). `flush()` writes the last
    block; the caller closes `fh`."""

    def __init__(
        self,
        fh,
        schema: dict,
        codec: str = "null",
        compression_level: int | None = None,
        sync_marker: bytes | None = None,
        encoder: AvroRecordEncoder | None = None,
    ):
        if codec not in ("null", "deflate"):
            raise ValueError(f"codec must be 'null' or 'deflate', got {codec!r}")
        self._fh, self._codec, self._level = fh, codec, compression_level
        self._sync = sync_marker or os.urandom(16)
        encoder = encoder or AvroRecordEncoder(schema)
        self._encode = encoder.encode
        self._block: list[bytes] = []
        self._block_bytes = 0
        header = io.BytesIO()  # fastavro's own header: same metadata and schema text
        fastavro.write.Writer(
            header,
            encoder.parsed_schema,
            codec=codec,
            sync_marker=self._sync,
            compression_level=compression_level,
        )
        fh.write(header.getvalue())

    def write(self, record) -> None:
        data = self._encode(record)
        self._block.append(data)
        self._block_bytes += len(data)
        if self._block_bytes >= _SYNC_INTERVAL:
            self._dump()

    def _dump(self) -> None:
        data = b"".join(self._block)
        if self._codec == "deflate":
            data = zlib.compress(data, -1 if self._level is None else self._level)[2:-1]
        self._fh.write(zigzag_varint(len(self._block)) + zigzag_varint(len(data)) + data + self._sync)
        self._block, self._block_bytes = [], 0

    def flush(self) -> None:
        if self._block:
            self._dump()


def encode_avro_file(
    records,
    schema: dict,
    codec: str = "null",
    sync_marker: bytes | None = None,
    encoder: AvroRecordEncoder | None = None,
) -> bytes:
    """A whole Avro file's bytes (AvroFileWriter on memory); pass `encoder` to reuse one (it compiles once)."""
    buf = io.BytesIO()
    writer = AvroFileWriter(buf, schema, codec=codec, sync_marker=sync_marker, encoder=encoder)
    for record in records:
        writer.write(record)
    writer.flush()
    return buf.getvalue()
