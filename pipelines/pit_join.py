"""Point-in-time join: labels (Avro) + offline feature rows (Parquet) -> training rows (Avro).

    python -m pipelines.pit_join --labels 'labels/*.avro' --features features/ --output training/

For each label and each entity (user, item, user_category = "user_id|item_category") and window spec,
the row of the LATEST window with `window_end <= impression_time` is attached. Windows are [start, end)
in event time, so every attached feature was computed from events strictly before the impression: a
window ending even 1 ms after it is never used. Columns are `<entity>_<window slug>_<feature>`, e.g.
`user_1h_5m_ctr`, plus `<entity>_<slug>_window_end` (the attached window's end, to see its age; the
latest window may be old when the entity was quiet). No such window -> nulls.
When a window has several rows (streaming panes, ACCUMULATING), the one with the most events is used.

Beam: CoGroupByKey of feature rows and label requests by entity, then `asof_features` (bisect) per
entity; a second CoGroupByKey by label puts each label's three entity parts together. Labels keep every
field of their Avro schema (read from the first matching file on the launcher). Without --runner the job
runs on FnApiRunner, named explicitly (see pipelines/batch.py).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import runfolder
from pipelines.launcher import (  # noqa: F401
    EXIT_CONFIG,
    add_overwrite_flag,
    beam_counters,
    json_summary,
    pipeline_options,
    run_main,
    run_pipeline,
)
from transforms.config import ConfigError
from transforms.features import ENTITY_TYPES, FEATURE_COLUMNS, UNKNOWN_CATEGORY, FeaturesConfig, features_for_entity
from transforms.privacy import redact_path

METRICS_NS = "feedback.pit_join"
REQUIRED_LABEL_FIELDS = ("request_id", "user_id", "item_id", "item_category", "impression_time", "label", "weight")
FEATURE_GLOB = "date=*/*.parquet"
_AVRO_TYPES = {"int64": "long", "float64": "double", "string": "string"}
_FEATURE_TYPES = dict(FEATURE_COLUMNS)
_log = logging.getLogger("pipelines.pit_join")


class PitJoinError(ConfigError):
    """Bad arguments or inputs, found before the pipeline runs (exit 2)."""


# --- pure functions --------------------------------------------------------------------------


def window_slug(window_label: str) -> str:
    return window_label.replace("/", "_")


def feature_columns(entities: Sequence[str], windows: Sequence[str]) -> list[tuple[str, str]]:
    """(output column, Avro type) for every attached feature, in output order."""
    cols = []
    for entity in entities:
        for w in windows:
            prefix = f"{entity}_{window_slug(w)}_"
            cols.append((prefix + "window_end", "long"))
            cols.extend((prefix + f, _AVRO_TYPES[_FEATURE_TYPES[f]]) for f in features_for_entity(entity))
    return cols


def label_key(label: dict) -> str:
    """Content id of a label record: identical records share it (and each still gets its own output row)."""
    blob = orjson.dumps(label, option=orjson.OPT_SORT_KEYS, default=repr)
    return hashlib.sha1(blob).hexdigest()


def entity_ids(label: dict, entities: Sequence[str]) -> list[tuple[str, str]]:
    """(entity_type, entity_id) of a label, as ComputeFeatures keys them."""
    out = []
    if "user" in entities and label.get("user_id") is not None:
        out.append(("user", label["user_id"]))
    if label.get("item_id") is not None:
        if "item" in entities:
            out.append(("item", label["item_id"]))
        if "user_category" in entities and label.get("user_id") is not None:
            out.append(("user_category", f"{label['user_id']}|{label.get('item_category') or UNKNOWN_CATEGORY}"))
    return out


def _pane_order(row: dict):
    # Same window_end: the row with the most events (the latest ACCUMULATING pane) sorts last; the
    # rest of the row breaks remaining ties so the choice never depends on input order.
    return row["window_end"], row.get("n_events") or 0, repr(sorted(row.items()))


def asof_features(
    entity_type: str, rows: Iterable[dict], requests: Iterable[tuple[str, int]], windows: Sequence[str]
) -> Iterator[tuple[str, dict]]:
    """One entity's feature rows and (label_key, impression_time) requests -> (label_key, columns).

    Per window spec, the attached row is the latest with window_end <= impression_time; none -> nulls.
    """
    index: dict[str, tuple[list[int], list[dict]]] = {}
    by_window: dict[str, list[dict]] = {}
    for r in rows:
        if r["entity_type"] == entity_type:
            by_window.setdefault(r["window"], []).append(r)
    for w, rs in by_window.items():
        rs.sort(key=_pane_order)
        ends, kept = [], []
        for r in rs:
            if ends and ends[-1] == r["window_end"]:
                kept[-1] = r  # a later pane of the same window
            else:
                ends.append(r["window_end"])
                kept.append(r)
        index[w] = (ends, kept)
    feats = features_for_entity(entity_type)
    for key, impression_time in sorted(set(requests)):
        out = {}
        for w in windows:
            prefix = f"{entity_type}_{window_slug(w)}_"
            ends, kept = index.get(w, ((), ()))
            i = bisect.bisect_right(ends, impression_time)  # ends[:i] <= impression_time < ends[i:]
            row = kept[i - 1] if i else None
            out[prefix + "window_end"] = row["window_end"] if row else None
            for f in feats:
                out[prefix + f] = row.get(f) if row else None
        yield key, out


def training_rows(labels: Iterable[dict], parts: Iterable[dict], columns: Sequence[str]) -> list[dict]:
    """The label record(s) of one label key + its entity parts -> training rows (absent columns null)."""
    merged = dict.fromkeys(columns)
    for part in parts:
        merged.update(part)
    return [{**label, **merged} for label in labels]


# --- Beam pieces -----------------------------------------------------------------------------


class _ReadFeatureRowsFn(beam.DoFn):
    def __init__(self, columns: Sequence[str], windows: Sequence[str], entities: Sequence[str]):
        self._columns = list(columns)
        self._windows = frozenset(windows)
        self._entities = frozenset(entities)
        self._rows = Metrics.counter(METRICS_NS, "feature_rows")
        self._skipped = Metrics.counter(METRICS_NS, "feature_rows_other_window_or_entity")

    def process(self, readable_file: fileio.ReadableFile):
        import pyarrow.parquet as pq

        with readable_file.open() as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            columns = [c for c in self._columns if c in names]
            for batch in pf.iter_batches(columns=columns):
                for row in batch.to_pylist():
                    if row["window"] in self._windows and row["entity_type"] in self._entities:
                        self._rows.inc()
                        yield (row["entity_type"], row["entity_id"]), row
                    else:
                        self._skipped.inc()


class _LabelRequestsFn(beam.DoFn):
    def __init__(self, entities: Sequence[str]):
        self._entities = tuple(entities)
        self._labels = Metrics.counter(METRICS_NS, "labels")

    def process(self, keyed_label):
        key, label = keyed_label
        self._labels.inc()
        for entity in entity_ids(label, self._entities):
            yield entity, (key, label["impression_time"])


class _AsOfFn(beam.DoFn):
    def __init__(self, windows: Sequence[str]):
        self._windows = tuple(windows)
        self._missing = {e: Metrics.counter(METRICS_NS, f"no_features_{e}") for e in ENTITY_TYPES}

    def process(self, element):
        (entity_type, _), grouped = element
        requests = list(grouped["requests"])
        if not requests:
            return
        rows = list(grouped["rows"])
        if not rows:
            self._missing[entity_type].inc(len(requests))
        yield from asof_features(entity_type, rows, requests, self._windows)


class _MergeFn(beam.DoFn):
    def __init__(self, columns: Sequence[str]):
        self._columns = tuple(columns)
        self._rows = Metrics.counter(METRICS_NS, "training_rows")

    def process(self, element):
        _, grouped = element
        rows = training_rows(grouped["labels"], grouped["parts"], self._columns)
        self._rows.inc(len(rows))
        yield from rows


def read_label_schema(labels_glob: str) -> dict:
    """The writer schema of the first labels file (launcher side); checks the required fields."""
    matches = FileSystems.match([labels_glob])[0].metadata_list
    if not matches:
        raise PitJoinError(f"--labels: no file matches {labels_glob!r}")
    with FileSystems.open(sorted(m.path for m in matches)[0]) as f:
        schema = fastavro.reader(f).writer_schema
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise PitJoinError("labels must be Avro records")
    missing = [n for n in REQUIRED_LABEL_FIELDS if n not in {fd["name"] for fd in schema["fields"]}]
    if missing:
        raise PitJoinError(f"labels schema lacks required fields {missing}")
    return schema


def output_schema(label_schema: dict, columns: Sequence[tuple[str, str]]) -> dict:
    names = {f["name"] for f in label_schema["fields"]}
    clash = sorted(names & {c for c, _ in columns})
    if clash:
        raise PitJoinError(f"label fields clash with feature columns: {clash}")
    return {
        "type": "record",
        "name": "TrainingRow",
        "namespace": "feedback.training",
        "fields": list(label_schema["fields"])
        + [{"name": c, "type": ["null", t], "default": None} for c, t in columns],
    }


def build(
    p: beam.Pipeline,
    labels_glob: str,
    features_dir: str,
    output: str,
    *,
    windows: Sequence[str] | None = None,
    entities: Sequence[str] | None = None,
    label_schema: dict | None = None,
    num_shards: int = 0,
) -> beam.PCollection:
    """Labels + features -> training rows written as Avro to `<output>/training-*.avro`; returns the rows."""
    windows = tuple(windows or (w.label for w in FeaturesConfig().windows))
    entities = tuple(entities or ENTITY_TYPES)
    bad = sorted(set(entities) - set(ENTITY_TYPES))
    if bad:
        raise PitJoinError(f"unknown entities {bad}; known: {list(ENTITY_TYPES)}")
    label_schema = label_schema or read_label_schema(labels_glob)
    columns = feature_columns(entities, windows)
    schema = output_schema(label_schema, columns)
    read_columns = ["entity_type", "entity_id", "window", "window_end"] + [n for n, _ in FEATURE_COLUMNS]

    labels = (
        p
        | "ReadLabels" >> beam.io.ReadFromAvro(labels_glob)
        | "KeyLabels" >> beam.Map(lambda r: (label_key(r), r)).with_output_types(tuple[str, dict])
    )
    requests = labels | "LabelEntities" >> beam.ParDo(_LabelRequestsFn(entities)).with_output_types(
        tuple[tuple[str, str], tuple[str, int]]
    )
    rows = (
        p
        | "MatchFeatures"
        >> fileio.MatchFiles(
            FileSystems.join(features_dir, FEATURE_GLOB), empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW
        )
        | "OpenFeatures" >> fileio.ReadMatches()
        | "ReadFeatureRows"
        >> beam.ParDo(_ReadFeatureRowsFn(read_columns, windows, entities)).with_output_types(
            tuple[tuple[str, str], dict]
        )
    )
    parts = (
        {"rows": rows, "requests": requests}
        | "GroupByEntity" >> beam.CoGroupByKey()
        | "AsOfLookup" >> beam.ParDo(_AsOfFn(windows)).with_output_types(tuple[str, dict])
    )
    training = (
        {"labels": labels, "parts": parts}
        | "GroupByLabel" >> beam.CoGroupByKey()
        | "MergeParts" >> beam.ParDo(_MergeFn([c for c, _ in columns]))
    )
    _ = training | "WriteTraining" >> beam.io.WriteToAvro(
        FileSystems.join(output, "training"), schema=schema, file_name_suffix=".avro", num_shards=num_shards
    )
    return training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.pit_join", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, help="File glob of label Avro files")
    parser.add_argument(
        "--features", required=True, help=f"Feature folder written by WriteOfflineFeatures ({FEATURE_GLOB})"
    )
    parser.add_argument("--output", required=True, help="Output folder for training-*.avro")
    parser.add_argument(
        "--windows",
        default=",".join(w.label for w in FeaturesConfig().windows),
        help="Comma-separated window labels to attach (default: %(default)s)",
    )
    parser.add_argument(
        "--entities", default=",".join(ENTITY_TYPES), help="Comma-separated entities (default: %(default)s)"
    )
    parser.add_argument("--num_shards", type=int, default=0, help="Output files; 0 lets the runner choose")
    add_overwrite_flag(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_known_args(argv)


def run(argv=None) -> dict:
    args, beam_args = parse_args(argv)
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    entities = [e.strip() for e in args.entities.split(",") if e.strip()]
    options = pipeline_options(beam_args)
    # Inputs must be published runs (no half-written labels or features); the output folder gets one
    # run, staged and published like the batch job's (pipelines/runfolder.py).
    runfolder.check_published(args.labels, "--labels")
    runfolder.check_published(FileSystems.join(args.features, FEATURE_GLOB), "--features")
    label_schema = read_label_schema(args.labels)
    folder = runfolder.prepare(args.output, "pit_join", args.overwrite)
    finished = run_pipeline(
        options,
        lambda p: build(
            p,
            args.labels,
            args.features,
            folder.staging,
            windows=windows,
            entities=entities,
            label_schema=label_schema,
            num_shards=args.num_shards,
        ),
    )
    report = {
        "job": "pit_join",
        "labels": redact_path(args.labels),
        "features": redact_path(args.features),
        "output": redact_path(args.output),
        "run_id": folder.run_id,
        "windows": windows,
        "entities": entities,
        "metrics": beam_counters(finished.result, METRICS_NS, qualified=False),
    }
    runfolder.publish(
        folder,
        runfolder.config_digest({k: report[k] for k in ("windows", "entities")}),
        {
            "labels": report["labels"],
            "features": report["features"],
            "training_rows": report["metrics"].get("training_rows"),
        },
    )
    return report


def main(argv=None) -> int:
    return run_main(run, argv, functools.partial(json_summary, exclude=()))


if __name__ == "__main__":
    sys.exit(main())
