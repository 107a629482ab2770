"""Reading raw records from archives and writing the job's outputs.

Input files are read whole per file (JSON lines, plain or gzip, and Avro), so every record carries its
exact bytes and a `path:line` (or `path#record`) source for dead letters. A `Reshuffle` then spreads
the records over workers for the parsing that follows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import uuid
from typing import Any, Optional

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import contract
from transforms.deadletter import dead_letter
from transforms.schemas import SchemaRegistry

METRICS_NS = "feedback.read"


class _NoRedaction:
    @staticmethod
    def redact(text: str) -> str:
        return text


_CHUNK = 8 << 20


def iter_lines(stream, chunk_size: int = _CHUNK):
    """A binary stream -> (line number, exact line bytes) without terminators, in bounded memory.

    Reads until the stream says EOF: Beam's CompressedFile.read() with no size returns at most one
    16 MiB buffer, so a single read() would silently lose the rest of a large .gz file.
    A final empty line (the file's trailing newline) is not a record; any other empty line is one
    (and is dead-lettered), so nothing in a file goes unaccounted.
    """
    n, tail = 0, b""
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            n += 1
            yield n, line[:-1] if line.endswith(b"\r") else line
    if tail:
        yield n + 1, tail[:-1] if tail.endswith(b"\r") else tail


def read_all(stream, chunk_size: int = _CHUNK) -> bytes:
    """Everything in a stream (see iter_lines for why a bare read() is not enough)."""
    parts = []
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


class _ReadFileFn(beam.DoFn):
    CORRUPT = "corrupt"

    def __init__(self, registry: SchemaRegistry):
        self._registry = registry
        self._records = Metrics.counter(METRICS_NS, "records")
        self._files = Metrics.counter(METRICS_NS, "files")

    def process(self, readable_file: fileio.ReadableFile):
        path = readable_file.metadata.path
        self._files.inc()
        if path.lower().endswith(".avro"):
            yield from self._avro(readable_file, path)
            return
        with readable_file.open(compression_type=CompressionTypes.AUTO) as f:
            for n, line in iter_lines(f):
                self._records.inc()
                yield f"{path}:{n}", line, None

    def _avro(self, readable_file, path):
        n = 0
        try:
            with readable_file.open(compression_type=CompressionTypes.UNCOMPRESSED) as f:
                reader = fastavro.reader(f)
                written = self._registry.match_writer(reader.writer_schema)
                for n, record in enumerate(reader, 1):
                    self._records.inc()
                    if isinstance(record, dict) and record.get("schema_version") is None and written:
                        record = {**record, "schema_version": written.version}
                    yield f"{path}#{n}", record, None
        except (OSError, ValueError, EOFError, fastavro.read.SchemaResolutionError, StopIteration) as e:
            # Everything before the damage was read; the rest of the file is one dead letter.
            self._records.inc()
            yield beam.pvalue.TaggedOutput(self.CORRUPT, dead_letter(
                contract.CORRUPT_FILE, None, f"Avro file unreadable after record {n}: {type(e).__name__}: {e}",
                "read", b"", f"{path}#{n + 1}", _NoRedaction()))


class ReadRawRecords(beam.PTransform):
    """A file glob -> RawRecord (source, payload) plus dead letters for unreadable files (tag CORRUPT).

    A glob that matches nothing fails the job at once: an empty input is almost always a typo.
    """
    CORRUPT = _ReadFileFn.CORRUPT

    def __init__(self, file_pattern: str, registry: SchemaRegistry, reshuffle: bool = True):
        super().__init__()
        self._pattern, self._registry, self._reshuffle = file_pattern, registry, reshuffle

    def expand(self, pbegin):
        read = (pbegin
                | "MatchFiles" >> fileio.MatchFiles(self._pattern, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
                | "OpenFiles" >> fileio.ReadMatches()
                | "ReadRecords" >> beam.ParDo(_ReadFileFn(self._registry)).with_outputs(self.CORRUPT, main="records"))
        records = read.records
        if self._reshuffle:
            records = records | "SpreadRecords" >> beam.Reshuffle()
        return {"records": records, self.CORRUPT: read[self.CORRUPT]}


def to_json_line(record: dict) -> str:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode()


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    root: str

    def _join(self, *parts):
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def events(self): return self._join("events", "events")
    @property
    def bots(self): return self._join("bots", "bots")
    @property
    def dead_letter(self): return self._join("dead_letter", "dead_letter")
    @property
    def duplicates(self): return self._join("duplicates", "duplicates")
    @property
    def consent_dropped(self): return self._join("consent_dropped", "consent_dropped")
    @property
    def labels(self): return self._join("labels", "labels")
    @property
    def slates(self): return self._join("slates", "slates")
    @property
    def orphans(self): return self._join("orphan_outcomes", "orphans")
    @property
    def late_outcomes(self): return self._join("late_outcomes", "late_outcomes")
    @property
    def features(self): return self._join("features")
    @property
    def counts(self): return self._join("_counts", "counts")
    @property
    def report(self): return self._join("report.json")
    @property
    def quality(self): return self._join("quality.json")
    @property
    def report_html(self): return self._join("report.html")

    def quality_part(self, name): return self._join("_quality", name)


class WriteJsonLines(beam.PTransform):
    def __init__(self, prefix: str, num_shards: int = 0):
        super().__init__()
        self._prefix, self._shards = prefix, num_shards

    def expand(self, records):
        return (records
                | "ToJson" >> beam.Map(to_json_line)
                | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl", num_shards=self._shards))


class WriteAvroEvents(beam.PTransform):
    def __init__(self, prefix: str, schema: dict, num_shards: int = 0):
        super().__init__()
        self._prefix, self._schema, self._shards = prefix, schema, num_shards

    def expand(self, events):
        return events | "WriteAvro" >> beam.io.WriteToAvro(
            self._prefix, schema=self._schema, file_name_suffix=".avro", num_shards=self._shards)


# --- windowed file sinks (streaming; also fine in batch) -----------------------------------------

def _stamp(ts) -> str:
    return ts.to_utc_datetime().strftime("%Y%m%dT%H%M%SZ")


def window_file_name(prefix: str, suffix: str, win, pane_index: int, shard: int, shards: int) -> str:
    parts = [prefix]
    if win != beam.transforms.window.GlobalWindow():
        parts += [_stamp(win.start), _stamp(win.end)]
    parts += [f"pane{pane_index}", f"{shard:05d}-of-{shards:05d}"]
    return "-".join(parts) + suffix


def encode_file(records: list, fmt: str, schema: Optional[dict], name: str) -> bytes:
    """The bytes of one output file: records sorted by their JSON form, so a replay is byte-identical
    (Avro's sync marker is derived from the file name instead of being random)."""
    ordered = sorted(records, key=lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS, default=str))
    if fmt == "jsonl":
        return b"".join(to_json_line(r).encode() + b"\n" for r in ordered)
    buf = io.BytesIO()
    marker = hashlib.sha256(name.encode()).digest()[:16]
    fastavro.writer(buf, fastavro.parse_schema(schema), ordered, sync_marker=marker)
    return buf.getvalue()


class _WritePaneFn(beam.DoFn):
    def __init__(self, directory: str, prefix: str, fmt: str, schema: Optional[dict], shards: int):
        self._directory, self._prefix, self._fmt, self._schema, self._shards = directory, prefix, fmt, schema, shards
        self._files = Metrics.counter("feedback.write", "files")
        self._records = Metrics.counter("feedback.write", "records")

    def process(self, keyed, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        shard, records = keyed
        records = list(records)
        if not records:
            # An empty pane (e.g. the ON_TIME firing after early panes took everything) holds nothing to
            # keep; writing it could replace a full file where a runner reports every pane as index 0
            # (measured on Beam's portable Flink runner: all panes arrive as ON_TIME, index 0).
            return
        name = window_file_name(self._prefix, "." + self._fmt, win, pane.index if pane else 0, shard, self._shards)
        path = FileSystems.join(self._directory, name)
        data = encode_file(records, self._fmt, self._schema, name)
        # Write then rename: a reader never sees half a file, and a retried bundle rewrites the same bytes.
        tmp = FileSystems.join(self._directory, f".tmp-{name}-{uuid.uuid4().hex}")
        with FileSystems.create(tmp) as f:
            f.write(data)
        FileSystems.rename([tmp], [path])
        self._files.inc()
        self._records.inc(len(records))
        yield path


class WriteWindowedFiles(beam.PTransform):
    """Windowed records -> one file per (window, pane, shard) under `directory`.

    Why not fileio.WriteToFiles: in Beam 2.77 its file names ignore the pane (apache/beam#18721) and
    restart shard numbers for every firing, so a window's late or early panes overwrite its earlier
    files -- records lost without an error (tests/test_streaming.py caught it). Here the records are
    grouped per (window, shard) with the input's trigger, and each firing writes its own file named by
    its pane index.
    """

    def __init__(self, directory: str, prefix: str, fmt: str = "jsonl", schema: Optional[dict] = None,
                 shards: int = 1):
        super().__init__()
        if fmt not in ("avro", "jsonl") or (fmt == "avro" and schema is None):
            raise ValueError("fmt must be 'jsonl', or 'avro' with a schema")
        self._directory, self._prefix, self._fmt, self._schema = directory.rstrip("/"), prefix, fmt, schema
        self._shards = max(1, shards)

    def expand(self, records):
        shards = self._shards
        return (records
                | "Shard" >> beam.Map(lambda r: (_shard_of(r, shards), r)).with_output_types(tuple[int, Any])
                | "GroupPane" >> beam.GroupByKey()
                | "WriteFile" >> beam.ParDo(_WritePaneFn(self._directory, self._prefix, self._fmt, self._schema,
                                                         shards)))


def _shard_of(record, shards: int) -> int:
    if shards == 1:
        return 0
    return int.from_bytes(hashlib.md5(orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)).digest()[:4],
                          "big") % shards
