"""The outputs the jobs write, declared once: name (= folder = report.json `outputs` key), format,
schema, the graph outputs they hold and the counters their records are counted under.

Like klio's `CONFNAME_TO_OUT_TRANSFORM`: jobs iterate a tuple of `Output` rows instead of spelling
folders, formats and schemas again. `BATCH_OUTPUTS` is what the batch job and the dead-letter replay
write, in step order; `STREAMING_OUTPUTS` what the streaming job writes (its order is its step order,
which Dataflow's --update matches on); `REPLAY_ARCHIVE_OUTPUTS` what an archive replay rewrites.
Folder and file names are on-disk contracts (README, Outputs): change them on purpose only.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from transforms import contract
from transforms.features import WriteOfflineFeatures
from transforms.io import WriteAvroEvents, WriteJsonLines, WriteSingleFile, WriteWindowedFiles, counter_line
from transforms.labels import LABEL_SCHEMA, SLATE_SCHEMA

AVRO = "avro"
JSONL = "jsonl"
PARQUET = "parquet"
FORMATS = (AVRO, JSONL, PARQUET)

# Stands for the clean event schema, derived from the schema registry at start-up (GraphSettings.clean_schema).
CLEAN_EVENT_SCHEMA = "clean_event"


@dataclasses.dataclass(frozen=True)
class Output:
    """One output folder.

    Args:
      name: folder under --output, streaming file prefix and report.json `outputs` key.
      fmt: AVRO, JSONL or PARQUET.
      schema: Avro schema, CLEAN_EVENT_SCHEMA, or None (JSON lines, Parquet).
      sources: GraphOutputs fields whose records the output holds (several are flattened together).
      counters: counter name of each source (same order), as `_counts` holds them; () when not counted.
      file_prefix: file-name prefix in batch folders (default: `name`).
      label: batch step label suffix, `"Write" + label` (default: `name` in CamelCase).
      time_field: the event-time field of a record (hourly replay partitions, output latency).
    """

    name: str
    fmt: str
    schema: dict | str | None
    sources: tuple
    counters: tuple = ()
    file_prefix: str = ""
    label: str = ""
    time_field: str = "event_time"

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"{self.name}: format {self.fmt!r} is not one of {FORMATS}")
        if (self.fmt == AVRO) != (self.schema is not None):
            raise ValueError(f"{self.name}: Avro outputs need a schema, other formats none")
        if self.counters and len(self.counters) != len(self.sources):
            raise ValueError(f"{self.name}: one counter per source, got {self.counters} for {self.sources}")

    @property
    def title(self) -> str:
        """CamelCase of the name (streaming step labels: Window<Title>, Write<Title>)."""
        return self.name.title().replace("_", "")

    @property
    def prefix(self) -> str:
        return self.file_prefix or self.name

    @property
    def write_label(self) -> str:
        return "Write" + (self.label or self.title)

    def schema_for(self, clean_schema: dict) -> dict | None:
        return clean_schema if self.schema == CLEAN_EVENT_SCHEMA else self.schema


EVENTS = Output("events", AVRO, CLEAN_EVENT_SCHEMA, ("valid",), (contract.OUTCOME_VALID,))
# Streaming's name for the valid events: the archive replays read.
ARCHIVE = dataclasses.replace(EVENTS, name="archive")
BOTS = Output("bots", AVRO, CLEAN_EVENT_SCHEMA, ("bots",), (contract.OUTCOME_BOT,))
DEAD_LETTER = Output(
    "dead_letter",
    JSONL,
    None,
    ("dead_letter", "too_late"),
    (contract.OUTCOME_DEAD_LETTER, contract.OUTCOME_TOO_LATE),
    label="DeadLetters",
)
LABELS = Output("labels", AVRO, LABEL_SCHEMA, ("labels",), (contract.COUNTER_LABELS,), time_field="impression_time")
SLATES = Output("slates", AVRO, SLATE_SCHEMA, ("slates",), time_field="impression_time")
ORPHAN_OUTCOMES = Output(
    "orphan_outcomes",
    JSONL,
    None,
    ("orphan_outcomes",),
    (contract.COUNTER_ORPHANS,),
    file_prefix="orphans",
    label="Orphans",
)
LATE_OUTCOMES = Output("late_outcomes", JSONL, None, ("late_outcomes",), (contract.COUNTER_LATE_OUTCOMES,))
DUPLICATES = Output("duplicates", JSONL, None, ("duplicates",), (contract.OUTCOME_DUPLICATE,))
CONSENT_DROPPED = Output("consent_dropped", JSONL, None, ("consent_dropped",), (contract.OUTCOME_CONSENT_DROPPED,))
FEATURES = Output("features", PARQUET, None, ("features",))
COUNTS = Output("_counts", JSONL, None, ("counts",), file_prefix="counts", label="Counts")

BATCH_OUTPUTS = (EVENTS, BOTS, DEAD_LETTER, LABELS, SLATES, ORPHAN_OUTCOMES, LATE_OUTCOMES, DUPLICATES, CONSENT_DROPPED)
STREAMING_OUTPUTS = (
    ARCHIVE,
    BOTS,
    LABELS,
    SLATES,
    DEAD_LETTER,
    ORPHAN_OUTCOMES,
    LATE_OUTCOMES,
    DUPLICATES,
    CONSENT_DROPPED,
)
REPLAY_ARCHIVE_OUTPUTS = (LABELS, SLATES, ORPHAN_OUTCOMES, LATE_OUTCOMES)
# Label-join outputs whose counters are read back as the `labels` summary, besides the outcomes.
LABEL_OUTPUTS = (LABELS, ORPHAN_OUTCOMES, LATE_OUTCOMES)


def counted(out, outputs=BATCH_OUTPUTS) -> dict:
    """{counter name: PCollection} of every counted source of `outputs` in a GraphOutputs."""
    return {counter: getattr(out, source) for o in outputs for source, counter in zip(o.sources, o.counters)}


def output_collections(out, outputs=BATCH_OUTPUTS, merged_label: str = "DeadAndTooLate") -> dict:
    """{output name: PCollection} from a GraphOutputs; an output of several sources is their Flatten
    (one per call: `merged_label` names it)."""
    result = {}
    for o in outputs:
        parts = tuple(getattr(out, s) for s in o.sources)
        result[o.name] = parts[0] if len(parts) == 1 else parts | merged_label >> beam.Flatten()
    return result


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """File prefixes of a batch run folder (local path or gs://...)."""

    root: str

    def _join(self, *parts):
        return "/".join([self.root.rstrip("/"), *parts])

    def of(self, output: Output) -> str:
        """`<root>/<folder>/<file prefix>` of an output (a folder for Parquet outputs)."""
        return self._join(output.name) if output.fmt == PARQUET else self._join(output.name, output.prefix)

    @property
    def features(self):
        return self.of(FEATURES)

    @property
    def counts(self):
        return self.of(COUNTS)

    @property
    def report(self):
        return self._join("report.json")

    @property
    def quality(self):
        return self._join("quality.json")

    @property
    def report_html(self):
        return self._join("report.html")

    def quality_part(self, name):
        return self._join("_quality", name)


# --- batch sinks ----------------------------------------------------------------------------------


def _sink(output: Output, prefix: str, schema, shards: int, deterministic: bool) -> beam.PTransform:
    if deterministic:
        folder, name = prefix.rsplit("/", 1)
        return WriteWindowedFiles(folder, name, output.fmt, schema, max(1, shards))
    if output.fmt == AVRO:
        return WriteAvroEvents(prefix, schema, shards)
    return WriteJsonLines(prefix, shards)


def build_outputs(out, settings, paths: OutputPaths, deterministic: bool = False) -> None:
    """The batch sinks (BATCH_OUTPUTS, features, counters). `deterministic`: sorted records in fixed-name
    files (replays rewrite the same bytes) instead of runner-sharded writes."""
    pcolls = output_collections(out, BATCH_OUTPUTS)
    for o in BATCH_OUTPUTS:
        _ = pcolls[o.name] | o.write_label >> _sink(
            o, paths.of(o), o.schema_for(settings.clean_schema), settings.num_shards, deterministic
        )
    if out.features is not None:
        _ = out.features | "WriteFeatures" >> WriteOfflineFeatures(paths.features)
    _ = (
        out.counts
        | "CountsToJson" >> beam.MapTuple(counter_line)
        | "WriteCounts" >> WriteSingleFile(paths.counts, ".jsonl")
    )
