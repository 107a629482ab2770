"""Offline feature sink: feature rows -> Parquet files under `<output_dir>/date=YYYY-MM-DD/` (UTC date
of window_end), one partition folder per day, with a check that every file really landed."""

from __future__ import annotations

import datetime as dt
import functools
import operator
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from transforms.features_config import KEY_COLUMNS, METRICS_NS, ROW_COLUMNS

__all__ = ["WriteOfflineFeatures", "arrow_schema", "partition_of"]

_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}


def arrow_schema() -> pa.Schema:
    key_names = {n for n, _ in KEY_COLUMNS}
    return pa.schema([pa.field(n, _ARROW_TYPES[t], nullable=n not in key_names) for n, t in ROW_COLUMNS])


def partition_of(row: dict) -> str:
    """'date=YYYY-MM-DD' of the row's window_end (UTC)."""
    return _partition_of_day(row["window_end"] // 86_400_000)


@functools.lru_cache(maxsize=4096)
def _partition_of_day(day: int) -> str:
    # Called for every row written (~2.5 rows per event with the shipped windows); a run spans few days.
    return f"date={(dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()}"


class _ParquetSink(fileio.FileSink):
    """Feature rows -> one Parquet file (arrow_schema), written in row groups of `batch_rows`.

    `create_metadata` also creates the row's partition folder under the output directory: WriteToFiles
    writes temp files then renames them to `<output_dir>/<file name>`, and a local rename into a missing
    folder fails (WriteToFiles only logs that at debug level; `_CheckWrittenFn` catches it too).
    """

    def __init__(self, output_dir: str, batch_rows: int = 65536):
        self._output_dir = output_dir
        self._batch_rows = batch_rows
        self._writer = None

    def create_metadata(self, destination, full_file_name):
        target = FileSystems.join(self._output_dir, destination)
        if FileSystems.get_filesystem(target).has_dirs() and not FileSystems.exists(target):
            try:
                FileSystems.mkdirs(target)
            except OSError:  # created meanwhile by another writer
                pass
        return fileio.FileMetadata(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED)

    def open(self, fh):
        import pyarrow.parquet as pq

        self._schema = arrow_schema()
        self._writer = pq.ParquetWriter(fh, self._schema, compression="snappy")
        self._row_values = operator.itemgetter(*self._schema.names)
        self._row_type = pa.struct(list(self._schema))
        self._rows = []  # one tuple of values (schema order) per row: a fraction of a row dict's memory

    def write(self, record):
        if self._writer is None:
            raise RuntimeError("write after flush: a Parquet file cannot be reopened")
        try:
            values = self._row_values(record)
        except KeyError:  # a missing column is written as null, as Table.from_pylist does
            values = tuple(record.get(name) for name in self._schema.names)
        self._rows.append(values)
        if len(self._rows) >= self._batch_rows:
            self._write_rows()

    def _write_rows(self):
        # The value tuples converted in one call, as a struct array (arrow reads tuples as structs):
        # Table.from_pylist on row dicts, one lookup per cell, cost over three times as much per row.
        if self._rows:
            values = pa.array(self._rows, type=self._row_type)
            self._writer.write_batch(pa.RecordBatch.from_struct_array(values))
            self._rows = []

    def flush(self):
        # WriteToFiles calls flush once, right before closing the file: the footer must be written here.
        if self._writer is not None:
            self._write_rows()
            self._writer.close()
            self._writer = None


def _partition_file_naming(window_, pane, shard_index, total_shards, compression, destination):
    if window_ == window.GlobalWindow():
        return f"{destination}/features-{shard_index:05d}-of-{total_shards:05d}.parquet"
    # Windowed (streaming) writes: WriteToFiles names files by destination and window only, so a late pane
    # of the same window would overwrite the earlier file; a random token keeps every pane's file.
    start, end = window_.start.micros // 1000, window_.end.micros // 1000
    return (
        f"{destination}/features-{start}-{end}-{uuid.uuid4().hex[:12]}-{shard_index:05d}-of-{total_shards:05d}.parquet"
    )


class _CheckWrittenFn(beam.DoFn):
    def __init__(self, output_dir: str):
        self._dir = output_dir
        self._files = Metrics.counter(METRICS_NS, "parquet_files")

    def process(self, result):
        path = FileSystems.join(self._dir, result.file_name)
        if not FileSystems.exists(path):
            raise OSError(f"feature file {path} was not written (WriteToFiles could not move its temp file)")
        self._files.inc()
        yield path


class _WritePartitionsPerBundleFn(beam.DoFn):
    """Rows (global window) -> one temp Parquet file per partition and bundle, written in row groups
    as rows come; (partition, temp path) pairs are emitted when the bundle ends. A retried bundle
    writes new temp files; the orphans go with the temp folder."""

    # Rows held per open file before a row group is written. A bundle on FnApiRunner is the whole input,
    # so 65,536 rows for each of a run's few day partitions held ~27 MiB more at 80,000 events
    # (~0.34 KiB per event of peak RSS); 8,192-row groups cost the same CPU.
    def __init__(self, temp_dir: str, batch_rows: int = 8192):
        self._temp_dir, self._batch_rows = temp_dir, batch_rows

    def start_bundle(self):
        # {UTC day of window_end: (partition, temp path, file handle, _ParquetSink)}: keyed by the day, so
        # partition_of's string is made once per file, not looked up for every row.
        self._open = {}

    def process(self, row):
        day = row["window_end"] // 86_400_000
        entry = self._open.get(day)
        if entry is None:
            part = _partition_of_day(day)
            path = FileSystems.join(self._temp_dir, f"{part}-{uuid.uuid4().hex}.parquet")
            fh = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
            sink = _ParquetSink(self._temp_dir, self._batch_rows)
            sink.open(fh)
            entry = self._open[day] = (part, path, fh, sink)
        entry[3].write(row)

    def finish_bundle(self):
        for part, path, fh, sink in sorted(self._open.values(), key=lambda entry: entry[0]):
            sink.flush()
            fh.close()
            yield WindowedValue((part, path), window.GlobalWindow().max_timestamp(), (window.GlobalWindow(),))
        self._open = {}


class _FinalizePartitionsFn(beam.DoFn):
    """All (partition, temp path) pairs of a write -> `<dir>/<partition>/features-SSSSS-of-NNNNN.parquet`
    (the names WriteToFiles gives through `_partition_file_naming`), then the temp folder is removed.
    Yields each final path once it is checked to exist. Renames already done (a retried finalize) are
    skipped."""

    def __init__(self, output_dir: str, temp_dir: str):
        self._dir, self._temp_dir = output_dir, temp_dir
        self._files = Metrics.counter(METRICS_NS, "parquet_files")

    def process(self, temp_files):
        by_partition: dict = {}
        for part, path in temp_files:
            by_partition.setdefault(part, []).append(path)
        finals = []
        for part, paths in sorted(by_partition.items()):
            folder = FileSystems.join(self._dir, part)
            if FileSystems.get_filesystem(folder).has_dirs() and not FileSystems.exists(folder):
                FileSystems.mkdirs(folder)
            n = len(paths)
            todo = []
            for i, temp in enumerate(sorted(paths)):
                final = FileSystems.join(folder, f"features-{i:05d}-of-{n:05d}.parquet")
                finals.append(final)
                if FileSystems.exists(temp):
                    todo.append((temp, final))
            if todo:
                FileSystems.rename([t for t, _ in todo], [f for _, f in todo])
        if FileSystems.exists(self._temp_dir):
            FileSystems.delete([self._temp_dir])  # with the temp files of retried bundles
        for final in finals:
            if not FileSystems.exists(final):
                raise OSError(f"feature file {final} was not written")
            self._files.inc()
            yield final


class WriteOfflineFeatures(beam.PTransform):
    """Feature rows -> Parquet under `<output_dir>/date=YYYY-MM-DD/` (UTC date of window_end).

    Returns the written file paths. Batch: rows in the global window, files written once at the end
    (without `shards`: one file per partition and bundle, renamed into place when all are written).
    Streaming: pass `streaming_window` (seconds) to write files per fixed window of the rows' timestamps
    (window_end - 1 ms), and `allowed_lateness` at least ComputeFeatures' own, or late panes are dropped here.
    """

    def __init__(
        self,
        output_dir: str,
        streaming_window: float | None = None,
        allowed_lateness: float = 0.0,
        shards: int | None = None,
    ):
        super().__init__()
        if not output_dir:
            raise ValueError("output_dir is required")
        if streaming_window is not None and streaming_window <= 0:
            raise ValueError(f"streaming_window must be > 0, got {streaming_window}")
        self._dir = output_dir
        self._streaming_window = streaming_window
        self._lateness = allowed_lateness
        self._shards = shards

    def expand(self, rows):
        if (
            self._streaming_window is None
            and self._shards is None
            and isinstance(rows.windowing.windowfn, window.GlobalWindows)
        ):
            # Batch, runner-chosen shards: one file per partition and bundle from a plain DoFn. WriteToFiles
            # invokes its writer DoFn per row with the row's window and pane (~5-10 µs per row here, with
            # ~2.5 rows per event), for the same layout.
            temp_dir = FileSystems.join(self._dir, f".temp-{uuid.uuid4().hex}")
            return (
                rows
                | "WriteBundles" >> beam.ParDo(_WritePartitionsPerBundleFn(temp_dir))
                | "TempFiles" >> beam.combiners.ToList()
                | "Finalize" >> beam.ParDo(_FinalizePartitionsFn(self._dir, temp_dir))
            )
        if self._streaming_window is not None:
            rows = rows | "WriteWindows" >> beam.WindowInto(
                window.FixedWindows(self._streaming_window), allowed_lateness=self._lateness
            )
        out_dir = self._dir
        written = rows | "WriteParquet" >> fileio.WriteToFiles(
            path=out_dir,
            destination=partition_of,
            sink=lambda _dest: _ParquetSink(out_dir),
            file_naming=_partition_file_naming,
            shards=self._shards,
        )
        return written | "CheckWritten" >> beam.ParDo(_CheckWrittenFn(out_dir))
