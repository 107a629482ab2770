"""Reading raw records from archives and writing the job's outputs.

Input files are read whole per file (JSON lines, plain or compressed, and Avro), so every record carries
its exact bytes and a `path:line` (or `path#record`) source for dead letters. A `Reshuffle` then spreads
the records over workers for the parsing that follows. A damaged or truncated file never fails the
job: what was read before the damage is kept and the unreadable rest becomes one `corrupt_file` dead
letter saying where reading stopped and why.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import io
import itertools
import json
import lzma
import re
import uuid
import zlib
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from transforms import contract
from transforms.avro_codec import AvroFileWriter, AvroRecordEncoder, encode_avro_file
from transforms.deadletter import dead_letter, scrub_damage_fields
from transforms.parse import RawChunk
from transforms.records import pack_values, unpack_values
from transforms.schemas import SchemaRegistry

METRICS_NS = "feedback.read"
WRITE_METRICS_NS = "feedback.write"


class _NoRedaction:
    @staticmethod
    def redact(text: str) -> str:
        return text


_CHUNK = 8 << 20
_COMPRESSED_CHUNK = 64 << 10  # compressed bytes per step: bounds one step's output (deflate expands <= ~1000x)


class _LineSplitter:
    """Chunks of bytes -> (line number, exact line bytes without terminator). `tail` holds the
    incomplete last line until the next chunk (or the end) completes it.

    With `max_bytes`, memory stays bounded whatever the line lengths: a line longer than `max_bytes`
    is kept only as its first `max_bytes + 1` bytes while the rest is skipped as it streams by, so
    the parser still sees a record over the limit (an `oversize_payload` dead letter holding a
    bounded prefix) and the record is counted once. `oversize` counts such lines and `longest` is the
    true length of the longest one (reported in the reader's counters)."""

    def __init__(self, max_bytes: int | None = None):
        self.count, self.tail = 0, b""
        self._max = max_bytes
        self._tail_len = 0  # true length of the incomplete line (tail holds at most max_bytes + 1 of it)
        self.oversize, self.longest = 0, 0

    def _line(self, line: bytes, true_len: int):
        self.count += 1
        if true_len == len(line) and line.endswith(b"\r"):
            line, true_len = line[:-1], true_len - 1
        if self._max is not None and true_len > self._max:
            self.oversize += 1
            self.longest = max(self.longest, true_len)
            return (self.count, _oversize_prefix(line, self._max))
        return (self.count, line)

    def feed(self, chunk: bytes) -> list:
        if self._max is None:
            lines = (self.tail + chunk).split(b"\n")
            self.tail = lines.pop()
            return [self._line(line, len(line)) for line in lines]
        pieces = chunk.split(b"\n")
        last = pieces.pop()
        out = []
        for i, piece in enumerate(pieces):
            if i == 0:
                line, true_len = self._keep(self.tail, piece), self._tail_len + len(piece)
                self.tail, self._tail_len = b"", 0
            else:
                line, true_len = piece[: self._max + 1], len(piece)
            out.append(self._line(line, true_len))
        self.tail, self._tail_len = self._keep(self.tail, last), self._tail_len + len(last)
        return out

    def _keep(self, head: bytes, more: bytes) -> bytes:
        """head + more, of which at most max_bytes + 1 bytes are kept."""
        room = self._max + 1 - len(head)
        return head + more[:room] if room > 0 else head

    def close(self) -> list:
        if not self._tail_len and not self.tail:
            return []
        tail, true_len = self.tail, max(self._tail_len, len(self.tail))
        self.tail, self._tail_len = b"", 0
        return [self._line(tail, true_len)]


_TOKEN_ENDS = re.compile(rb'["\x20\t,:{}\[\]]')


def _oversize_prefix(line: bytes, max_bytes: int) -> bytes:
    """What travels on for a line over the limit: its first bytes, cut back to the last JSON delimiter so
    that no value (an e-mail, a phone number) is split where redaction could no longer recognise it,
    then padded with spaces to max_bytes + 1 bytes, so parsing sees a record over the limit."""
    kept = line[: max_bytes + 1]
    ends = [m.end() for m in _TOKEN_ENDS.finditer(kept)]
    kept = kept[: ends[-1]] if ends else b""
    return kept + b" " * (max_bytes + 1 - len(kept))


def iter_lines(stream, chunk_size: int = _CHUNK):
    """A binary stream -> (line number, exact line bytes) without terminators, in bounded memory.

    Reads until the stream says EOF: Beam's CompressedFile.read() with no size returns at most one
    16 MiB buffer, so a single read() would silently lose the rest of a large .gz file.
    A final empty line (the file's trailing newline) is not a record; any other empty line is one
    (and is dead-lettered), so nothing in a file goes unaccounted.
    """
    lines = _LineSplitter()
    for chunk in iter(lambda: stream.read(chunk_size), b""):
        yield from lines.feed(chunk)
    yield from lines.close()


def read_all(stream, chunk_size: int = _CHUNK) -> bytes:
    """Everything in a stream (see iter_lines for why a bare read() is not enough)."""
    parts = []
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


# --- damaged files ------------------------------------------------------------------------------

# What report.json lists per damaged file (the same keys are on its corrupt_file dead letter).
DAMAGE_FIELDS = ("file", "stopped_at", "records_read", "offset", "error")


@dataclasses.dataclass(frozen=True)
class Damage:
    """Why and where reading a file stopped early. Everything before `stopped_at` was read and kept."""

    file: str
    stopped_at: str  # source of the first record not read: `path:line` or `path#record`
    records_read: int
    offset: int  # bytes of the stored (possibly compressed) file read when the damage was found
    error: str

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in DAMAGE_FIELDS}


def damage_dead_letter(damage: Damage) -> dict:
    """The unreadable rest of a file as ONE dead letter (it counts as one input record). A file name
    can hold PII: the name, the stopped_at source and the error text (which may quote the path) are
    masked here, the one place a damaged file's name enters an output (report.json `damaged_files`
    and `_quality/damaged_files` are built from these dead letters)."""
    fields = scrub_damage_fields(damage.as_dict())
    record = dead_letter(
        contract.CORRUPT_FILE,
        None,
        f"file unreadable after record {damage.records_read} ({damage.offset} bytes of the file read): "
        f"{fields['error']}",
        "read",
        b"",
        fields["stopped_at"],
        _NoRedaction(),
    )
    record.update(fields)
    return record


class StorageError(Exception):
    """Reading the stored bytes failed (network, permissions): the runner retries the bundle. Not
    damage in the file, so never turned into a dead letter."""


class _CountingStream:
    """The raw file: counts the bytes read (where reading stopped) and tells storage errors apart
    from errors in decoding the bytes. A length read from damaged bytes (a negative or huge Avro
    block size) is damage, not a storage error: it is refused or capped at what the file holds
    before the storage layer would try to allocate it."""

    def __init__(self, f, size: int | None = None):
        self._f, self._size, self.offset = f, size, 0

    def read(self, size: int = -1) -> bytes:
        if size is not None and size < -1:
            raise ValueError(f"asked to read {size} bytes (a damaged length field)")
        if size is not None and size > _CHUNK and self._size is not None:
            size = min(size, max(self._size - self.offset, _CHUNK))
        try:
            data = self._f.read(size)
        except Exception as e:  # noqa: BLE001 - any failure of the storage layer itself
            raise StorageError(f"{type(e).__name__}: {e}") from e
        self.offset += len(data)
        return data


def _decompressor(compression: str):
    """A fresh incremental decompressor (Beam's choices in apache_beam.io.filesystem.CompressedFile).
    Each one has `eof` (its end-of-stream marker was seen) and `unused_data` (bytes after it)."""
    if compression == CompressionTypes.GZIP:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if compression == CompressionTypes.DEFLATE:
        return zlib.decompressobj()
    if compression == CompressionTypes.BZIP2:
        return bz2.BZ2Decompressor()
    if compression == CompressionTypes.LZMA:
        return lzma.LZMADecompressor()
    if compression == CompressionTypes.ZSTD:
        import zstandard  # a Beam dependency; imported here like Beam does

        return zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj()
    raise ValueError(f"unsupported compression {compression!r}")


class TruncatedStream(EOFError):
    """The file ended before its compressed stream did."""


def decompressed_chunks(raw, compression: str, chunk_size: int = _COMPRESSED_CHUNK) -> Iterator[bytes]:
    """The decompressed content of a compressed file, in chunks, raising where Beam's CompressedFile
    stops quietly: a file that ends inside a compressed stream (no end-of-stream marker) is truncated
    (TruncatedStream), and bytes that do not decompress raise the codec's own error. Concatenated
    streams (multi-member gzip, bzip2, xz, zstd frames) are read one after the other, as Beam does.
    An empty file has no records."""
    decompressor, pending, fed = _decompressor(compression), b"", 0
    while True:
        if decompressor.eof:
            pending = decompressor.unused_data or raw.read(chunk_size)
            if not pending:
                return
            if compression == CompressionTypes.GZIP and pending[:1] == b"\0":
                _trailing_zeros(pending, raw, chunk_size)
                return
            decompressor = _decompressor(compression)
        elif not pending:
            pending = raw.read(chunk_size)
            if not pending:
                if fed:
                    raise TruncatedStream(f"the file ends inside its {compression} stream (truncated upload?)")
                return
        fed += len(pending)
        data, pending = decompressor.decompress(pending), b""
        if data:
            yield data


def _trailing_zeros(pending: bytes, raw, chunk_size: int) -> None:
    """After a complete gzip member, zero bytes to the end of the file are padding (tape blocks, some
    uploaders): gzip ignores them and so do we. Anything else after them is damage."""
    while pending:
        if pending.strip(b"\0"):
            raise zlib.error("bytes other than zero padding after the last gzip member")
        pending = raw.read(chunk_size)


def _decode_errors() -> tuple:
    import zstandard

    return (zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, ValueError)


def _describe(error: BaseException) -> str:
    kind = type(error)
    name = kind.__name__ if kind.__module__ in ("builtins", __name__) else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {error}"


AVRO_MAGIC = b"Obj\x01"  # the first bytes of every Avro object container file


class _ChunkReader:
    """A file-like view of decompressed chunks (for Avro inside a compressed file); `offset` is the
    stored file's. A read of more than MAX_READ bytes at once (a length read from damaged bytes; no
    Avro block or value of ours comes near it) is refused before anything is decompressed for it."""

    MAX_READ = 256 << 20

    def __init__(self, head: bytes, chunks: Iterator[bytes], raw: _CountingStream):
        self._buf, self._chunks, self._raw = bytearray(head), chunks, raw

    @property
    def offset(self) -> int:
        return self._raw.offset

    def read(self, size: int = -1) -> bytes:
        if size is not None and (size < -1 or size > self.MAX_READ):
            raise ValueError(f"asked to read {size} bytes at once (a damaged length field)")
        want = None if size is None or size < 0 else size
        while want is None or len(self._buf) < want:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        n = len(self._buf) if want is None else min(want, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def read_file(
    path: str, raw: _CountingStream, registry: SchemaRegistry, max_line_bytes: int | None = None
) -> Generator[tuple, None, Damage | None]:
    """Any input file: `.avro` is Avro; anything else is decompressed by its suffix (as Beam detects
    it) and then read as Avro when its content starts with the Avro magic (`x.avro.gz`, an Avro file
    named `.jsonl`), else as JSON lines. Avro content is never split into "lines"."""
    if path.lower().endswith(".avro"):
        return (yield from read_avro(path, raw, registry))
    compression = CompressionTypes.detect_compression_type(path)
    if compression == CompressionTypes.UNCOMPRESSED:
        chunks = iter(lambda: raw.read(_CHUNK), b"")
    else:
        chunks = decompressed_chunks(raw, compression)
    head = b""
    try:
        while len(head) < len(AVRO_MAGIC):
            chunk = next(chunks, None)
            if chunk is None:
                break
            head += chunk
    except _decode_errors() as e:
        return Damage(path, f"{path}:1", 0, raw.offset, _describe(e))
    if head.startswith(AVRO_MAGIC):
        return (yield from read_avro(path, _ChunkReader(head, chunks, raw), registry))
    return (yield from read_json_lines(path, raw, max_line_bytes, content=itertools.chain([head], chunks)))


def read_json_lines(
    path: str, raw: _CountingStream, max_line_bytes: int | None = None, content: Iterator[bytes] | None = None
) -> Generator[tuple, None, Damage | None]:
    """(source, line bytes) for each line of a JSON-lines file, plain or compressed (by suffix, as
    Beam detects it). Returns a Damage when the file cannot be read to its end: the lines before it
    are yielded, an incomplete line at the damage is part of the unreadable rest. A line longer than
    `max_line_bytes` comes as its first `max_line_bytes + 1` bytes (see _LineSplitter): memory stays
    bounded. `content`: the decompressed chunks, when the caller already started reading them."""
    if content is not None:
        chunks = content
    elif CompressionTypes.detect_compression_type(path) == CompressionTypes.UNCOMPRESSED:
        chunks = iter(lambda: raw.read(_CHUNK), b"")
    else:
        chunks = decompressed_chunks(raw, CompressionTypes.detect_compression_type(path))
    lines = _LineSplitter(max_line_bytes)
    try:
        for chunk in chunks:
            for n, line in lines.feed(chunk):
                yield f"{path}:{n}", line
    except _decode_errors() as e:
        return Damage(path, f"{path}:{lines.count + 1}", lines.count, raw.offset, _describe(e))
    finally:
        if lines.oversize:
            Metrics.counter(METRICS_NS, "oversize_lines").inc(lines.oversize)
            Metrics.distribution(METRICS_NS, "oversize_line_bytes").update(lines.longest)
    for n, line in lines.close():
        yield f"{path}:{n}", line
    return None


# --- Avro block checksums -------------------------------------------------------------------------
# The Avro spec: "snappy: ... each compressed block is followed by the 4-byte, big-endian CRC32
# checksum of the uncompressed data in the block". fastavro (1.x, fastavro/_read_py.py
# snappy_read_block) reads those 4 bytes and drops them, so a flipped bit in a snappy block gave
# silently different records. Its block readers are looked up by codec in fastavro's BLOCK_READERS
# table at read time (the C reader passes the file object): the snappy entry is replaced by one that
# checks the CRC. What the other codecs detect (README "Damaged input files"): bzip2 (block CRC) and
# xz (CRC64 check) detect a flipped bit themselves; zstandard only if the writer stored a frame
# checksum; deflate (raw, no checksum in Avro) and null detect only bytes that no longer decode, so a
# flipped bit inside a string can pass unnoticed there.


class AvroChecksumError(ValueError):
    """A snappy block's uncompressed data does not match the CRC32 written after it."""


def _read_avro_long(fo) -> int:
    shift = result = 0
    while True:
        b = fo.read(1)
        if not b:
            raise EOFError("the file ends inside a block header")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return (result >> 1) ^ -(result & 1)
        shift += 7
        if shift > 63:
            raise ValueError("a block length longer than 64 bits (damaged)")


def _checked_snappy_block(fo) -> io.BytesIO:
    from cramjam import snappy

    length = _read_avro_long(fo)
    if length < 4:
        raise ValueError(f"snappy block of {length} bytes cannot hold its CRC32 (damaged length)")
    data, crc = fo.read(length - 4), fo.read(4)
    if len(data) != length - 4 or len(crc) != 4:
        raise EOFError("the file ends inside a snappy block")
    block = bytes(snappy.decompress_raw(data))
    if zlib.crc32(block) != int.from_bytes(crc, "big"):
        raise AvroChecksumError(
            f"snappy block CRC32 mismatch (stored {crc.hex()}, computed {zlib.crc32(block):08x}): the block is damaged"
        )
    return io.BytesIO(block)


def install_avro_checksums() -> None:
    """Makes fastavro check each snappy block's CRC32 (idempotent; done on import and in setup)."""
    from fastavro import read as fastavro_read

    fastavro_read.BLOCK_READERS["snappy"] = _checked_snappy_block


install_avro_checksums()


def read_avro(path: str, raw: _CountingStream, registry: SchemaRegistry) -> Generator[tuple, None, Damage | None]:
    """(source, record dict) for each record of an Avro file (any codec fastavro reads: null,
    deflate, snappy, ...). Returns a Damage when a block cannot be decoded."""
    n = 0
    # fastavro decoding damaged bytes raises whatever they lead to (zlib.error, cramjam's
    # DecompressionError, EOFError, IndexError, UnicodeDecodeError, OverflowError, ValueError, ...):
    # any of them means the rest of this file cannot be read. Storage errors are re-raised.
    try:
        reader = fastavro.reader(raw)
        written = registry.match_writer(reader.writer_schema)
        records = iter(reader)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - see above
        return Damage(path, f"{path}#1", 0, raw.offset, _describe(e))
    while True:
        try:
            record = next(records)
        except StopIteration:
            return None
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - see above
            return Damage(path, f"{path}#{n + 1}", n, raw.offset, _describe(e))
        n += 1
        if isinstance(record, dict) and record.get("schema_version") is None and written:
            record = {**record, "schema_version": written.version}
        yield f"{path}#{n}", record


class _ReadFileFn(beam.DoFn):
    CORRUPT = "corrupt"

    def __init__(self, registry: SchemaRegistry, max_line_bytes: int | None = None):
        self._registry = registry
        self._max_line = max_line_bytes
        self._records = Metrics.counter(METRICS_NS, "records")
        self._files = Metrics.counter(METRICS_NS, "files")
        self._damaged = Metrics.counter(METRICS_NS, "damaged_files")

    def setup(self):
        install_avro_checksums()

    def process(self, readable_file: fileio.ReadableFile):
        path = readable_file.metadata.path
        self._files.inc()
        # Raw bytes: decompression is done here (read_file), where a truncated stream is seen.
        with readable_file.open(compression_type=CompressionTypes.UNCOMPRESSED) as f:
            raw = _CountingStream(f, readable_file.metadata.size_in_bytes)
            records = read_file(path, raw, self._registry, self._max_line)
            damage = yield from self._emit(records)
        if damage is not None:
            self._damaged.inc()
            self._records.inc()
            yield beam.pvalue.TaggedOutput(self.CORRUPT, damage_dead_letter(damage))

    def _emit(self, records):
        """(source, payload) -> RawRecord, counted; returns the reader's Damage (or None)."""
        n = 0
        try:
            while True:
                try:
                    source, payload = next(records)
                except StopIteration as stop:
                    return stop.value
                n += 1
                yield source, payload, None
        finally:
            self._records.inc(n)


class _ReadFileChunksFn(_ReadFileFn):
    """As _ReadFileFn, but the records come as lists of up to `chunk` RawRecords (in file order): packed
    (records.pack_values: one bytes object per list through the shuffle, not three objects per record),
    or as RawChunks (`packed=False`)."""

    def __init__(self, registry: SchemaRegistry, chunk: int, max_line_bytes: int | None = None, packed: bool = True):
        super().__init__(registry, max_line_bytes)
        self._chunk = chunk
        self._seal = pack_values if packed else RawChunk

    def _emit(self, records):
        chunk = []
        damage = yield from _chunks_of(super()._emit(records), self._chunk, chunk, self._seal)
        if chunk:
            yield self._seal(chunk)
        return damage


def _chunks_of(records, size: int, chunk: list, seal=pack_values):
    """Yields full lists of `size` from a generator, each passed through `seal` (a copy: packed by
    records.pack_values, or a RawChunk), filling `chunk` (the caller emits what is left); returns the
    generator's return value."""
    while True:
        try:
            chunk.append(next(records))
        except StopIteration as stop:
            return stop.value
        if len(chunk) >= size:
            yield seal(chunk)
            chunk.clear()


def _raw_chunks(packed: bytes, size: int) -> list:
    """A packed list of RawRecords -> RawChunks of up to `size` records."""
    records = unpack_values(packed)
    return [RawChunk(records[i : i + size]) for i in range(0, len(records), size)]


class ReadRawRecords(beam.PTransform):
    """A file glob -> RawRecords (source, payload, None), in RawChunks by default, plus, for each
    damaged file, one `corrupt_file` dead letter for its unreadable rest (tag CORRUPT; it carries the
    DAMAGE_FIELDS).

    A glob that matches nothing fails the job at once: an empty input is almost always a typo.

    Args:
      file_pattern: glob of JSONL (plain, gzip, ...) and Avro archives.
      registry: the schema versions Avro archives may be written with.
      reshuffle: spread the records over workers after reading (a file is read by one worker).
      max_line_bytes: the configured max payload size (validation.max_event_bytes). A longer JSON
        line is skipped while the file streams and only its first max_line_bytes + 1 bytes travel on,
        so parsing dead-letters it as oversize_payload with a bounded raw: memory stays bounded
        whatever the line length. Default DEFAULT_MAX_LINE_BYTES.
      chunked: "records" holds RawChunks of up to PARSE_CHUNK records of one file (element type
        RawChunk, which `build_event_graph` parses in chunks); False: one RawRecord per element.

    Returns {"records": PCollection[RawChunk] (or [RawRecord]), CORRUPT: PCollection[dict]}.
    """

    CORRUPT = _ReadFileFn.CORRUPT
    DEFAULT_MAX_LINE_BYTES = 1 << 20

    # Records per shuffled element: Reshuffle's per-element work (random key, timestamps, grouping)
    # is paid once per chunk; chunks of 1,000 still spread a file over many workers.
    CHUNK = 1000
    # Records per RawChunk (chunked=True). Smaller than CHUNK: a chunk's events are alive together
    # through parse, privacy and enrichment. Measured on FnApiRunner (read -> enrich -> KeyByEventId,
    # 320k events): chunks of 1,000 cost ~2 µs per event more than one element per record, a cost
    # that went away with the garbage collector off (the young objects outlive its young
    # generations); chunks of 30-100 cost ~1-2.5 µs per event less.
    PARSE_CHUNK = 50

    def __init__(
        self,
        file_pattern: str,
        registry: SchemaRegistry,
        reshuffle: bool = True,
        max_line_bytes: int | None = None,
        chunked: bool = True,
    ):
        super().__init__()
        max_line_bytes = self.DEFAULT_MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
        if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be a positive int: {max_line_bytes!r}")
        self._pattern, self._registry, self._reshuffle = file_pattern, registry, reshuffle
        self._max_line = max_line_bytes
        self._chunked = chunked

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict:
        if self._reshuffle:
            read_fn = _ReadFileChunksFn(self._registry, self.CHUNK, self._max_line)
        elif self._chunked:
            read_fn = _ReadFileChunksFn(self._registry, self.PARSE_CHUNK, self._max_line, packed=False)
        else:
            read_fn = _ReadFileFn(self._registry, self._max_line)
        read_records = beam.ParDo(read_fn)
        if self._chunked and not self._reshuffle:
            read_records = read_records.with_output_types(RawChunk)
        read = (
            pbegin
            | "MatchFiles"
            >> fileio.MatchFiles(self._pattern, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
            # Files are matched from the pipeline's single Impulse element: without a shuffle here the
            # reading is fused with it, and one worker reads every file in one bundle. Shuffled, the
            # files spread over the workers.
            | "SpreadFiles" >> beam.Reshuffle()
            | "OpenFiles" >> fileio.ReadMatches()
            | "ReadRecords" >> read_records.with_outputs(self.CORRUPT, main="records")
        )
        records = read.records
        if self._reshuffle:
            spread = records | "SpreadRecords" >> beam.Reshuffle()
            if self._chunked:
                records = spread | "Records" >> beam.FlatMap(_raw_chunks, self.PARSE_CHUNK).with_output_types(RawChunk)
            else:
                records = spread | "Records" >> beam.FlatMap(unpack_values)
        return {"records": records, self.CORRUPT: read[self.CORRUPT]}


def to_json_line(record: dict) -> str:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode()


# --- counter files (`_counts`, `_quality/counters`): one {"counter", "count"} row per key and shard ---


def counter_record(key: str, count: int) -> dict:
    return {"counter": key, "count": count}


def counter_line(key: str, count: int) -> str:
    return json.dumps(counter_record(key, count))


def sum_counters(rows: Iterable[dict]) -> dict:
    """Counter rows (from several shards or panes) -> {counter: total}."""
    totals: dict = {}
    for row in rows:
        totals[row["counter"]] = totals.get(row["counter"], 0) + row["count"]
    return totals


AVRO_CODEC = "deflate"  # WriteToAvro's default; ~2 µs per record more than "null" for ~7x smaller files
# zlib's fastest level: ~1-2 µs less per clean-event record than its default (6), files ~5% larger
# (62.5 vs 59.3 bytes per record). Readers do not depend on the level.
AVRO_DEFLATE_LEVEL = 1


class _WriteBundleFileFn(beam.DoFn):
    """Records (global window) -> one temp file per bundle, streamed as they come; the file's path
    is emitted when the bundle ends. A retried bundle writes a new temp file; the orphan is removed
    with the temp folder."""

    def __init__(self, temp_dir: str, fmt: str, schema: dict | None):
        self._temp_dir, self._fmt, self._schema = temp_dir, fmt, schema
        self._fh = self._writer = self._path = None

    def setup(self):
        self._encoder = AvroRecordEncoder(self._schema) if self._fmt == "avro" else None

    def start_bundle(self):
        self._fh = self._writer = self._path = None

    def _open(self):
        self._path = FileSystems.join(self._temp_dir, f"{uuid.uuid4().hex}.{self._fmt}")
        self._fh = FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
        if self._fmt == "avro":
            self._writer = AvroFileWriter(
                self._fh, self._schema, codec=AVRO_CODEC, compression_level=AVRO_DEFLATE_LEVEL, encoder=self._encoder
            )

    def process(self, record):
        if self._fh is None:
            self._open()
        if self._writer is not None:
            self._writer.write(record)
        else:
            self._fh.write(orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE))

    def finish_bundle(self):
        if self._fh is None:
            return
        if self._writer is not None:
            self._writer.flush()
        self._fh.close()
        path, self._fh, self._writer = self._path, None, None
        yield WindowedValue(path, GlobalWindow().max_timestamp(), (GlobalWindow(),))


class _FinalizeFilesFn(beam.DoFn):
    """All temp files of a write -> `<prefix>-SSSSS-of-NNNNN<suffix>` (the names Beam's file sinks
    give), then the temp folder is removed. No records: one empty file (an Avro file keeps its header),
    as WriteToText/WriteToAvro write. Renames are skipped when already done (a retried finalize)."""

    def __init__(self, prefix: str, suffix: str, temp_dir: str, fmt: str, schema: dict | None):
        self._prefix, self._suffix, self._temp_dir, self._fmt, self._schema = prefix, suffix, temp_dir, fmt, schema
        self._files = Metrics.counter(WRITE_METRICS_NS, "files")

    def process(self, temp_paths):
        temp_paths = sorted(temp_paths)
        n = max(1, len(temp_paths))
        finals = [f"{self._prefix}-{i:05d}-of-{n:05d}{self._suffix}" for i in range(n)]
        if not temp_paths:
            with FileSystems.create(finals[0], compression_type=CompressionTypes.UNCOMPRESSED) as f:
                if self._fmt == "avro":
                    fastavro.writer(f, fastavro.parse_schema(self._schema), [], codec=AVRO_CODEC)
        else:
            todo = [(t, f) for t, f in zip(temp_paths, finals) if FileSystems.exists(t)]
            if todo:
                FileSystems.rename([t for t, _ in todo], [f for _, f in todo])
        leftovers = [m.path for m in FileSystems.match([FileSystems.join(self._temp_dir, "*")])[0].metadata_list]
        if leftovers:  # temp files of retried bundles
            FileSystems.delete(leftovers)
        if FileSystems.exists(self._temp_dir):  # a folder on file systems that have them
            FileSystems.delete([self._temp_dir])
        self._files.inc(n)
        yield from finals


class WriteFilesPerBundle(beam.PTransform):
    """Records in the global window -> `<prefix>-SSSSS-of-NNNNN<suffix>` files, one per bundle (Avro
    with `schema`, or JSON lines with sorted keys). Returns the final file names.

    Why not WriteToAvro / WriteToText: their WriteImpl re-windows every record into the global window
    and writes it from a DoFn with a side input, two of Beam's slowest per-element paths (~5 µs per
    record on FnApiRunner, benchmarks/RESULTS.md); here each record costs one plain DoFn call. Same
    file layout and codec: one file per bundle, renamed into place once all bundles are written.
    """

    def __init__(self, prefix: str, suffix: str, fmt: str, schema: dict | None = None):
        super().__init__()
        if fmt not in ("avro", "jsonl") or (fmt == "avro" and schema is None):
            raise ValueError("fmt must be 'jsonl', or 'avro' with a schema")
        self._prefix, self._suffix, self._fmt, self._schema = prefix, suffix, fmt, schema

    def expand(self, records):
        temp_dir = f"{self._prefix.rsplit('/', 1)[0]}/.temp-{uuid.uuid4().hex}"
        return (
            records
            | "WriteBundles" >> beam.ParDo(_WriteBundleFileFn(temp_dir, self._fmt, self._schema))
            | "TempFiles" >> beam.combiners.ToList()
            | "Finalize" >> beam.ParDo(_FinalizeFilesFn(self._prefix, self._suffix, temp_dir, self._fmt, self._schema))
        )


class _WriteLinesFileFn(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, lines):
        directory, name = self._path.rsplit("/", 1)
        # Write then rename: a reader never sees half a file, and a retry rewrites the same bytes.
        tmp = FileSystems.join(directory, f".tmp-{name}-{uuid.uuid4().hex}")
        with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(b"".join(line.encode() + b"\n" for line in sorted(lines)))
        FileSystems.rename([tmp], [self._path])
        yield self._path


@beam.typehints.with_input_types(str)
class WriteSingleFile(beam.PTransform):
    """Text lines -> one file `<prefix>-00000-of-00001<suffix>`, lines sorted (the name
    WriteToText(num_shards=1) gives; an empty input gives an empty file). Holds all lines in one
    worker's memory: for small outputs (counters, quality signals). Returns the file name.

    Why not WriteToText: its bounded write stamps each written shard with MAX_TIMESTAMP, past the end
    of the global window, and reads them back as a side input. Flink's streaming translation of a
    bounded job (--use_data_stream_for_batch) rejects such an element: `IllegalStateException:
    TimestampCombiner moved element from ... (TIMESTAMP_MAX_VALUE) to earlier time ... (end of global
    window)`.
    """

    def __init__(self, prefix: str, suffix: str):
        super().__init__()
        self._path = f"{prefix}-00000-of-00001{suffix}"

    def expand(self, lines):
        return lines | "Collect" >> beam.combiners.ToList() | "WriteFile" >> beam.ParDo(_WriteLinesFileFn(self._path))


def _per_bundle_ok(pcoll, num_shards: int) -> bool:
    """Per-bundle files serve runner-sharded writes of global-window or bounded records; anything else
    goes through Beam's own sinks."""
    return num_shards == 0 and (pcoll.is_bounded or isinstance(pcoll.windowing.windowfn, GlobalWindows))


def _in_global_window(pcoll):
    """A bounded collection re-windowed into the global window, as Beam's bounded file sinks do
    before writing. Why not leave windowed records to WriteToText/WriteToAvro: they stamp their
    written shards with MAX_TIMESTAMP, which Flink's streaming translation of a bounded job
    (--use_data_stream_for_batch) rejects (see WriteSingleFile)."""
    if isinstance(pcoll.windowing.windowfn, GlobalWindows):
        return pcoll
    return pcoll | "GlobalWindow" >> beam.WindowInto(GlobalWindows())


@beam.typehints.with_input_types(dict)
class WriteJsonLines(beam.PTransform):
    """Records -> JSON lines (sorted keys) in runner-sharded files `<prefix>-SSSSS-of-NNNNN.jsonl`.

    Args:
      prefix: path and file-name prefix.
      num_shards: number of files; 0 lets the runner choose.
    """

    def __init__(self, prefix: str, num_shards: int = 0):
        super().__init__()
        self._prefix, self._shards = prefix, num_shards

    def expand(self, records: beam.PCollection[dict]) -> beam.PCollection[str]:
        if _per_bundle_ok(records, self._shards):
            return _in_global_window(records) | "WriteJsonl" >> WriteFilesPerBundle(self._prefix, ".jsonl", "jsonl")
        return (
            records
            | "ToJson" >> beam.Map(to_json_line)
            | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl", num_shards=self._shards)
        )


@beam.typehints.with_input_types(dict)
class WriteAvroEvents(beam.PTransform):
    """Records -> Avro files `<prefix>-SSSSS-of-NNNNN.avro`.

    Args:
      prefix: path and file-name prefix.
      schema: the Avro writer schema (a dict).
      num_shards: number of files; 0 lets the runner choose.
    """

    def __init__(self, prefix: str, schema: dict, num_shards: int = 0):
        super().__init__()
        self._prefix, self._schema, self._shards = prefix, schema, num_shards

    def expand(self, events: beam.PCollection[dict]) -> beam.PCollection[str]:
        if _per_bundle_ok(events, self._shards):
            return _in_global_window(events) | "WriteAvroFiles" >> WriteFilesPerBundle(
                self._prefix, ".avro", "avro", self._schema
            )
        return events | "WriteAvro" >> beam.io.WriteToAvro(
            self._prefix, schema=self._schema, file_name_suffix=".avro", num_shards=self._shards, codec=AVRO_CODEC
        )


# --- windowed file sinks (streaming; also fine in batch) -----------------------------------------


def _stamp(ts) -> str:
    return ts.to_utc_datetime().strftime("%Y%m%dT%H%M%SZ")


def window_file_name(
    prefix: str, suffix: str, win, pane_index: int, shard: int, shards: int, content: bytes = b""
) -> str:
    """`<prefix>[-<window start>-<window end>]-pane<i>-<content digest>-SSSSS-of-NNNNN<suffix>`.

    The digest of the file's content tells firings apart even where a runner reports every pane as
    index 0 (Beam's portable Flink runner does): with discarding panes each firing holds other records,
    so no firing replaces another's file; the same records give the same name, so a retried bundle or
    a replay rewrites the same file."""
    parts = [prefix]
    if win != beam.transforms.window.GlobalWindow():
        parts += [_stamp(win.start), _stamp(win.end)]
    digest = hashlib.sha256(content).hexdigest()[:12]
    parts += [f"pane{pane_index}", digest, f"{shard:05d}-of-{shards:05d}"]
    return "-".join(parts) + suffix


def encode_file(
    records: list, fmt: str, schema: dict | None, name: str, encoder: AvroRecordEncoder | None = None
) -> bytes:
    """The bytes of one output file, records in the order given (Avro's sync marker is derived from the
    file name instead of being random, so the same records and name give the same bytes)."""
    if fmt == "jsonl":
        return b"".join(to_json_line(r).encode() + b"\n" for r in records)
    return encode_avro_file(records, schema, sync_marker=hashlib.sha256(name.encode()).digest()[:16], encoder=encoder)


class _WritePaneFn(beam.DoFn):
    def __init__(self, directory: str, prefix: str, fmt: str, schema: dict | None, shards: int):
        self._directory, self._prefix, self._fmt, self._schema, self._shards = directory, prefix, fmt, schema, shards
        self._files = Metrics.counter(WRITE_METRICS_NS, "files")
        self._records = Metrics.counter(WRITE_METRICS_NS, "records")

    def setup(self):
        # Compiled once per worker, not per pane.
        self._encoder = AvroRecordEncoder(self._schema) if self._fmt == "avro" else None

    def process(self, keyed, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        shard, records = keyed
        records = list(records)
        if not records:  # an empty firing (e.g. ON_TIME after early panes took everything): nothing to keep
            return
        # Sorted by their JSON form: a replay writes byte-identical files.
        dumped = sorted((orjson.dumps(r, option=orjson.OPT_SORT_KEYS, default=str), n) for n, r in enumerate(records))
        ordered = [records[n] for _, n in dumped]
        content = b"\n".join(d for d, _ in dumped)
        pane_index = pane.index if pane else 0
        name = window_file_name(self._prefix, "." + self._fmt, win, pane_index, shard, self._shards, content)
        path = FileSystems.join(self._directory, name)
        data = encode_file(ordered, self._fmt, self._schema, name, self._encoder)
        # Write then rename: a reader never sees half a file, and a retried bundle rewrites the same bytes.
        tmp = FileSystems.join(self._directory, f".tmp-{name}-{uuid.uuid4().hex}")
        with FileSystems.create(tmp) as f:
            f.write(data)
        FileSystems.rename([tmp], [path])
        self._files.inc()
        self._records.inc(len(records))
        yield path


@beam.typehints.with_input_types(dict)
class WriteWindowedFiles(beam.PTransform):
    """Windowed records -> one file per (window, pane, shard) under `directory`.

    Why not fileio.WriteToFiles: in Beam 2.77 its file names ignore the pane (apache/beam#18721) and
    restart shard numbers for every firing, so a window's late or early panes overwrite its earlier
    files -- records lost without an error (tests/test_streaming.py caught it). Here the records are
    grouped per (window, shard) with the input's trigger, and each firing writes its own file named by
    its pane index and a digest of its records (`window_file_name`).

    Args:
      directory: folder of the files.
      prefix: file-name prefix; the window, pane and shard follow it.
      fmt: "jsonl", or "avro" with `schema`.
      schema: the Avro writer schema.
      shards: files per window and pane (records are spread by a hash of their content).

    Returns the written paths.
    """

    def __init__(self, directory: str, prefix: str, fmt: str = "jsonl", schema: dict | None = None, shards: int = 1):
        super().__init__()
        if fmt not in ("avro", "jsonl") or (fmt == "avro" and schema is None):
            raise ValueError("fmt must be 'jsonl', or 'avro' with a schema")
        self._directory, self._prefix, self._fmt, self._schema = directory.rstrip("/"), prefix, fmt, schema
        self._shards = max(1, shards)

    def expand(self, records: beam.PCollection[dict]) -> beam.PCollection[str]:
        shards = self._shards
        return (
            records
            | "Shard" >> beam.Map(lambda r: (_shard_of(r, shards), r)).with_output_types(tuple[int, Any])
            | "GroupPane" >> beam.GroupByKey()
            | "WriteFile" >> beam.ParDo(_WritePaneFn(self._directory, self._prefix, self._fmt, self._schema, shards))
        )


def _shard_of(record, shards: int) -> int:
    if shards == 1:
        return 0
    return (
        int.from_bytes(hashlib.md5(orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)).digest()[:4], "big")
        % shards
    )
