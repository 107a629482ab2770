"""Reading raw records from archives and writing the job's outputs.

Input files are read whole per file (JSON lines, plain or gzip, and Avro), so every record carries its
exact bytes and a `path:line` (or `path#record`) source for dead letters. A `Reshuffle` then spreads
the records over workers for the parsing that follows.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
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
