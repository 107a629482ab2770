"""Replay and backfill: re-derive labels from the streaming archive, or re-process dead letters.

    # labels, slates, orphan and late outcomes for impressions in [from, to), from the archive
    python -m pipelines.replay archive --config config/batch.yaml --archive 'DIR/archive/**/*.avro' \
        --from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z --output DIR/replay/2026-11-01

    # dead letters re-run through the whole graph after a fix (e.g. a new schema version)
    python -m pipelines.replay dead-letters --config config/batch.yaml --dead-letters 'DIR/dead_letter/*.jsonl' \
        --output DIR/replay/dead-letters-1

Archive replay guarantees:
- One run per output folder (pipelines/runfolder.py): outputs are staged and published with
  `_MANIFEST.json` and `_SUCCESS`; a used folder is refused unless `--overwrite` replaces its run.
  Backfill range by range into one folder each (e.g. `DIR/replay/2026-11-01`).
- Deterministic: outputs are partitioned by impression hour, one file per hour and shard, named by
  the hour, records sorted, Avro sync markers derived from the name. Re-running a range rewrites the
  same files byte for byte; with `--overwrite` the report's `replayability` compares them with the
  replaced run's manifest.
- Overlapping ranges never disagree: `--from`/`--to` must be whole hours; every range reads enough
  archive around it (attribution window, lateness, clock skew) to settle its hours completely, so a
  shared hour is computed identically by both runs (same file, same bytes).
- The archive holds valid human events (already private, enriched, deduplicated, bot-filtered, with
  session ids and arrival times), so the replay starts at the label join, with the same decisions as
  streaming (`transforms/labels.py` rules on event and arrival time).

Dead-letter replay: every dead letter read is one input record and ends in exactly one outcome of the
replay's own accounting (valid / duplicates / bots / dead_letter / consent_dropped / too_late), so a
record that now parses is counted once; outputs are deterministic, so replaying the same dead letters
again replaces, not duplicates. Payloads were redacted when dead-lettered (no raw PII is kept), so
replayed events carry tokens where an e-mail or IP was, and no IP network.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import logging
import sys

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window

from pipelines import runfolder
from pipelines.graph import GraphSettings, build_event_graph
from pipelines.launcher import (
    add_overwrite_flag,
    beam_counters,
    json_summary,
    pipeline_options,
    read_counters,
    refuse_unless,
    run_main,
    run_pipeline,
    runner_name,
    write_json,
)
from pipelines.outputs import (
    COUNTS,
    LABELS,
    LATE_OUTCOMES,
    ORPHAN_OUTCOMES,
    REPLAY_ARCHIVE_OUTPUTS,
    SLATES,
    OutputPaths,
    build_outputs,
)
from transforms import contract
from transforms.accounting import CountOutcomes, label_summary, summarise
from transforms.config import ConfigError, load_config
from transforms.io import WriteWindowedFiles, counter_record, read_all
from transforms.labels import BuildSlates, JoinLabels, LabelRules, is_exposure, label_polarity
from transforms.parse import parse_event_time
from transforms.privacy import redact_path
from transforms.records import RecordPacker, field_order

PARTITION_S = 3600
_REPLAYED = tuple(o.name for o in REPLAY_ARCHIVE_OUTPUTS)
_log = logging.getLogger("pipelines.replay")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.replay", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("archive", help="labels from the streaming archive for a time range")
    a.add_argument("--config", required=True)
    a.add_argument("--archive", required=True, help="Glob of archive Avro files (streaming output archive/)")
    a.add_argument(
        "--from", dest="start", required=True, help="Start of the impression-time range (whole hour, ISO-8601)"
    )
    a.add_argument("--to", dest="end", required=True, help="End of the range, exclusive (whole hour, ISO-8601)")
    a.add_argument("--output", required=True)
    add_overwrite_flag(a)
    d = sub.add_parser("dead-letters", help="re-run dead letters through the whole graph after a fix")
    d.add_argument("--config", required=True)
    d.add_argument("--dead-letters", required=True, help="Glob of dead-letter JSONL files")
    d.add_argument("--output", required=True)
    add_overwrite_flag(d)
    return parser


def parse_args(argv=None):
    return build_parser().parse_known_args(argv)


def _hour_ms(text: str, flag: str) -> int:
    try:
        ms = parse_event_time(text, naive_as_utc=False)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if ms % (PARTITION_S * 1000):
        raise ConfigError(
            f"{flag}: {text!r} is not a whole hour; replay ranges are whole hours so that a "
            f"replayed hour is always complete (use e.g. 2026-11-01T10:00:00Z)"
        )
    return ms


# --- archive replay ------------------------------------------------------------------------------


def archived_event(record: dict) -> dict:
    """An archive Avro record -> the event dict the graph uses (epoch-ms times)."""
    e = dict(record)
    for k in ("event_time", "arrival_time"):
        if isinstance(e.get(k), dt.datetime):
            e[k] = parse_event_time(e[k], naive_as_utc=True)
    return e


class _ReadArchiveFn(beam.DoFn):
    def __init__(self, read_from: int, read_to: int):
        self._from, self._to = read_from, read_to

    def process(self, readable_file):
        with readable_file.open() as f:
            for record in fastavro.reader(f):
                e = archived_event(record)
                if self._from <= e["event_time"] < self._to:
                    yield window.TimestampedValue(e, e["event_time"] / 1000.0)


def label_margin_ms(rules: LabelRules) -> int:
    """How much archive around a range settles every label, orphan and late outcome inside it."""
    return max(rules.window_ms, rules.lateness_ms) + rules.clock_skew_ms + 1


def in_range(field: str, start: int, end: int):
    return lambda r: start <= r[field] < end


@beam.typehints.with_input_types(dict)
class WriteHourly(beam.PTransform):
    """Records -> WriteWindowedFiles per hour of `time_field` (one file per hour: deterministic names).

    Args:
      directory, prefix, fmt, schema: as for WriteWindowedFiles.
      time_field: the epoch-ms field that picks a record's hour.
    """

    def __init__(self, directory: str, prefix: str, fmt: str, schema=None, time_field: str = "event_time"):
        super().__init__()
        self._args = (directory, prefix, fmt, schema)
        self._field = time_field

    def expand(self, records: beam.PCollection[dict]) -> beam.PCollection[str]:
        field = self._field
        return (
            records
            | "StampPartition" >> beam.Map(lambda r: window.TimestampedValue(r, r[field] / 1000.0))
            | "Hours" >> beam.WindowInto(window.FixedWindows(PARTITION_S))
            | "Write" >> WriteWindowedFiles(*self._args)
        )


def build_archive_replay(p, settings: GraphSettings, archive_glob: str, start: int, end: int, output: str):
    margin = label_margin_ms(settings.labels)
    events = (
        p
        | "MatchArchive" >> fileio.MatchFiles(archive_glob)
        | "OpenArchive" >> fileio.ReadMatches()
        | "ReadArchive" >> beam.ParDo(_ReadArchiveFn(start - margin, end + margin))
    )
    joined = events | "Labels" >> JoinLabels(settings.labels, RecordPacker(field_order(settings.archive_schema)))
    labels = joined.labels | "LabelsInRange" >> beam.Filter(in_range("impression_time", start, end))
    slates = labels | "Slates" >> BuildSlates()
    in_range_outputs = {LABELS.name: labels, SLATES.name: slates}
    for o, tag in ((ORPHAN_OUTCOMES, JoinLabels.ORPHANS), (LATE_OUTCOMES, JoinLabels.LATE_OUTCOMES)):
        in_range_outputs[o.name] = joined[tag] | f"{o.title}InRange" >> beam.Filter(in_range(o.time_field, start, end))
    root = output.rstrip("/")
    for o in REPLAY_ARCHIVE_OUTPUTS:
        _ = in_range_outputs[o.name] | f"Write{o.title}" >> WriteHourly(
            f"{root}/{o.name}", o.name, o.fmt, o.schema, o.time_field
        )
    exposures = (
        events
        | "Exposures" >> beam.Filter(is_exposure)
        | "ExposuresInRange" >> beam.Filter(in_range("event_time", start, end))
    )
    counted = {
        contract.COUNTER_EXPOSURES: exposures,
        contract.COUNTER_LABELS: labels,
        contract.COUNTER_ORPHANS: in_range_outputs[ORPHAN_OUTCOMES.name],
        contract.COUNTER_LATE_OUTCOMES: in_range_outputs[LATE_OUTCOMES.name],
    }
    _ = (
        counted
        | "Accounting" >> CountOutcomes({contract.COUNTER_LABELS: label_polarity})
        | "CountsToJson" >> beam.MapTuple(counter_record)
        | "WriteCounts" >> WriteWindowedFiles(f"{root}/{COUNTS.name}", COUNTS.prefix, COUNTS.fmt)
    )
    return labels


# --- dead-letter replay --------------------------------------------------------------------------


def dead_letter_payload(record: dict) -> bytes:
    """The (redacted) payload a dead letter kept, as bytes to parse again."""
    raw = record.get("raw", "")
    if record.get("raw_encoding") == "base64":
        return base64.b64decode(raw)
    return raw.encode("utf-8")


class _ReadDeadLettersFn(beam.DoFn):
    """Dead letters -> RawRecords to parse again. A corrupt_file dead letter has no record to replay
    (it stands for a file's unreadable rest): it goes out unchanged on CORRUPT, with its details, and
    is accounted once as an input and once as a dead letter."""

    CORRUPT = "corrupt"

    def process(self, readable_file):
        path = readable_file.metadata.path
        with readable_file.open() as f:
            data = read_all(f)
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            record = orjson.loads(line)
            if record.get("reason") == contract.CORRUPT_FILE:
                yield beam.pvalue.TaggedOutput(self.CORRUPT, record)
                continue
            arrival = record.get("arrival_time")
            yield f"replay:{record.get('source') or path + ':' + str(n)}", dead_letter_payload(record), arrival


def build_dead_letter_replay(p, settings: GraphSettings, dead_glob: str, output: str):
    raw = (
        p
        | "MatchDeadLetters" >> fileio.MatchFiles(dead_glob)
        | "OpenDeadLetters" >> fileio.ReadMatches()
        | "ReadDeadLetters" >> beam.ParDo(_ReadDeadLettersFn()).with_outputs(_ReadDeadLettersFn.CORRUPT, main="raw")
    )
    out = build_event_graph(raw.raw, settings, upstream_dead_letters=[raw[_ReadDeadLettersFn.CORRUPT]])
    build_outputs(out, settings, OutputPaths(output), deterministic=True)
    return out


def _digest_files(root: str, start: int, end: int) -> dict:
    """sha256 of every output file of the hours in [start, end) under `root`."""
    import hashlib

    hours = set()
    t = start
    while t < end:
        hours.add(dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
        t += PARTITION_S * 1000
    digests = {}
    for name in _REPLAYED:
        for m in FileSystems.match([f"{root.rstrip('/')}/{name}/*"])[0].metadata_list:
            base = m.path.rsplit("/", 1)[-1]
            if any(f"-{h}-" in base for h in hours):
                with FileSystems.open(m.path) as f:
                    digests[f"{name}/{base}"] = hashlib.sha256(read_all(f)).hexdigest()
    return dict(sorted(digests.items()))


def record_replay(staging: str, start: int, end: int, previous_manifest) -> dict:
    """Replayability: compares this run's files for the range with those of the run it replaces
    (`--overwrite`: the old manifest's sha256s), when that run replayed the same range.
    {"previous_run", "identical", "files", "differing"}."""
    current = _digest_files(staging, start, end)
    previous = None
    if (
        previous_manifest
        and previous_manifest.get("job") == "replay-archive"
        and previous_manifest.get("range_ms") == [start, end]
    ):
        previous = {
            e["path"]: e["sha256"]
            for e in previous_manifest.get("files", [])
            if e["path"].split("/", 1)[0] in _REPLAYED
        }
    if previous is None:
        return {"previous_run": False, "identical": None, "files": len(current), "differing": []}
    differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    return {"previous_run": True, "identical": not differing, "files": len(current), "differing": differing}


def run(argv=None) -> dict:
    args, beam_args = parse_args(argv)
    cfg = load_config(args.config)
    settings = GraphSettings.from_config(cfg)
    options = pipeline_options(beam_args)
    if args.mode == "archive":
        start, end = _hour_ms(args.start, "--from"), _hour_ms(args.end, "--to")
        if end <= start:
            raise ConfigError("--to must be after --from")
        runfolder.check_published(args.archive, "--archive")
    else:
        runfolder.check_published(args.dead_letters, "--dead-letters")
    folder = runfolder.prepare(args.output, f"replay-{args.mode}", args.overwrite)
    paths = OutputPaths(folder.staging)
    if args.mode == "archive":
        finished = run_pipeline(
            options, lambda p: build_archive_replay(p, settings, args.archive, start, end, folder.staging)
        )
    else:
        finished = run_pipeline(
            options, lambda p: build_dead_letter_replay(p, settings, args.dead_letters, folder.staging)
        )
    report = {
        "job": f"replay-{args.mode}",
        "config": args.config,
        "output": redact_path(args.output),
        "run_id": folder.run_id,
        "runner": runner_name(options),
        "beam_version": beam.__version__,
        "elapsed_seconds": finished.elapsed_seconds,
        "metrics": beam_counters(finished.result),
    }
    if args.mode == "archive":
        labels = label_summary(read_counters(paths.counts))
        report.update(
            range={"from": args.start, "to": args.end},
            archive=redact_path(args.archive),
            labels=labels,
            replayability=record_replay(folder.staging, start, end, folder.previous_manifest),
        )
        published = {"range_ms": [start, end], "labels": labels}
        refuse_unless(
            labels["one_label_per_exposure"],
            f"{labels['exposures']} exposures in range but {labels['labels']} labels",
            paths.report,
            report,
        )
    else:
        summary = summarise(read_counters(paths.counts))
        report.update(dead_letters=redact_path(args.dead_letters), **summary)
        published = {"counts": summary["counts"], "accounting": summary["accounting"]}
        refuse_unless(
            summary["accounting"]["holds"],
            f"replayed dead letters not accounted for exactly once: {summary['accounting']}",
            paths.report,
            report,
        )
    write_json(paths.report, report)
    runfolder.publish(folder, runfolder.config_digest(cfg.model_dump_json()), published)
    return report


def main(argv=None) -> int:
    return run_main(run, argv, json_summary)


if __name__ == "__main__":
    sys.exit(main())
