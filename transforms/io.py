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
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

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


AVRO_CODEC = "deflate"   # WriteToAvro's default; ~2 µs per record more than "null" for ~7x smaller files


class _WriteBundleFileFn(beam.DoFn):
    """Records (global window) -> one temp file per bundle, streamed as they come; the file's path
    is emitted when the bundle ends. A retried bundle writes a new temp file; the orphan is removed
    with the temp folder."""

    def __init__(self, temp_dir: str, fmt: str, schema: Optional[dict]):
        self._temp_dir, self._fmt, self._schema = temp_dir, fmt, schema
        self._fh = self._writer = self._path = None

    def setup(self):
        self._parsed = fastavro.parse_schema(self._schema) if self._fmt == "avro" else None

    def start_bundle(self):
        self._fh = self._writer = self._path = None

    def _open(self):
        self._path = FileSystems.join(self._temp_dir, f"{uuid.uuid4().hex}.{self._fmt}")
        self._fh = FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
        if self._fmt == "avro":
            self._writer = fastavro.write.Writer(self._fh, self._parsed, codec=AVRO_CODEC)

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

    def __init__(self, prefix: str, suffix: str, temp_dir: str, fmt: str, schema: Optional[dict]):
        self._prefix, self._suffix, self._temp_dir, self._fmt, self._schema = prefix, suffix, temp_dir, fmt, schema
        self._files = Metrics.counter("feedback.write", "files")

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

    def __init__(self, prefix: str, suffix: str, fmt: str, schema: Optional[dict] = None):
        super().__init__()
        if fmt not in ("avro", "jsonl") or (fmt == "avro" and schema is None):
            raise ValueError("fmt must be 'jsonl', or 'avro' with a schema")
        self._prefix, self._suffix, self._fmt, self._schema = prefix, suffix, fmt, schema

    def expand(self, records):
        temp_dir = f"{self._prefix.rsplit('/', 1)[0]}/.temp-{uuid.uuid4().hex}"
        return (records
                | "WriteBundles" >> beam.ParDo(_WriteBundleFileFn(temp_dir, self._fmt, self._schema))
                | "TempFiles" >> beam.combiners.ToList()
                | "Finalize" >> beam.ParDo(_FinalizeFilesFn(self._prefix, self._suffix, temp_dir, self._fmt,
                                                            self._schema)))


def _per_bundle_ok(pcoll, num_shards: int) -> bool:
    """Per-bundle files serve runner-sharded writes of global-window records; anything else goes
    through Beam's own sinks."""
    return num_shards == 0 and isinstance(pcoll.windowing.windowfn, GlobalWindows)


class WriteJsonLines(beam.PTransform):
    def __init__(self, prefix: str, num_shards: int = 0):
        super().__init__()
        self._prefix, self._shards = prefix, num_shards

    def expand(self, records):
        if _per_bundle_ok(records, self._shards):
            return records | "WriteJsonl" >> WriteFilesPerBundle(self._prefix, ".jsonl", "jsonl")
        return (records
                | "ToJson" >> beam.Map(to_json_line)
                | "Write" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl", num_shards=self._shards))


class WriteAvroEvents(beam.PTransform):
    def __init__(self, prefix: str, schema: dict, num_shards: int = 0):
        super().__init__()
        self._prefix, self._schema, self._shards = prefix, schema, num_shards

    def expand(self, events):
        if _per_bundle_ok(events, self._shards):
            return events | "WriteAvroFiles" >> WriteFilesPerBundle(self._prefix, ".avro", "avro", self._schema)
        return events | "WriteAvro" >> beam.io.WriteToAvro(
            self._prefix, schema=self._schema, file_name_suffix=".avro", num_shards=self._shards, codec=AVRO_CODEC)


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
