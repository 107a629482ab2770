"""Streaming job: Pub/Sub or Kafka in; labels, features, dead letters and an event archive out, continuously.

    python -m pipelines.streaming --config config/streaming.yaml --subscription projects/P/subscriptions/S \
        --output DIR [--labels-topic T] [--dead-letter-topic T] [beam options]
    python -m pipelines.streaming --config CONFIG_WITH_A_KAFKA_SECTION --output DIR [beam options]

The source is Pub/Sub (--subscription or --topic) or, when the config has a `kafka:` section, a Kafka
topic read with Beam's cross-language ReadFromKafka (transforms/kafka_io.py: on Flink, with a Java
expansion service in an EMBEDDED environment); exactly one of them.

Same graph as the batch job (`pipelines/graph.py`), with the streaming implementations of the
stateful steps. Arrival time is the Pub/Sub publish time (Kafka: the record timestamp); event time
is the `event_time` field (or the `time.event_time_attribute` attribute). Outputs under DIR are
windowed files:
`archive/` (every valid event with its arrival time: the replay source), `labels/`, `slates/`,
`dead_letter/` (including too_late), `orphan_outcomes/`, `late_outcomes/`, `bots/`, `_counts/`.
Without --runner the job runs on the Python BundleBasedDirectRunner (named explicitly; see
shared/BEAM-NOTES.md for its Pub/Sub delivery guarantee: at-most-once, acked before processing).
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import sys
import threading
import time

import apache_beam as beam
import fastavro
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from pipelines import runfolder
from pipelines.graph import GraphOutputs, GraphSettings, build_event_graph
from pipelines.launcher import add_overwrite_flag, pipeline_options, run_main
from pipelines.outputs import ARCHIVE, COUNTS, DEAD_LETTER, FEATURES, LABELS, output_collections
from pipelines.outputs import STREAMING_OUTPUTS as STREAMING_FILES
from transforms import contract
from transforms.accounting import summarise
from transforms.config import ConfigError, JobConfig, WindowSpec, load_config
from transforms.deadletter import dead_letter
from transforms.features import WriteOfflineFeatures
from transforms.io import WriteWindowedFiles, counter_record, to_json_line
from transforms.kafka_io import ReadKafkaRecords, WriteKafkaRecords
from transforms.online_store import WriteOnlineFeatures
from transforms.quality import evaluate_slos
from transforms.schemas import SchemaRegistry
from transforms.signals import LATENCY_EDGES_MS, bucket_index, stats_from_parts

DEFAULT_RUNNER = "apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner"
METRICS_NS = "feedback.pubsub"
_log = logging.getLogger("pipelines.streaming")


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags (Beam pipeline options are passed through). Also read by the Flex
    Template metadata test, which checks templates/*/metadata.json against it."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.streaming", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML job config, e.g. config/streaming.yaml")
    # Not required here: a `kafka:` section of the config is the other source (checked in run()).
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--subscription", help="projects/<p>/subscriptions/<s> to read")
    source.add_argument("--topic", help="projects/<p>/topics/<t> to read (a temporary subscription is made)")
    parser.add_argument("--output", required=True, help="Folder for windowed output files (local or gs://)")
    parser.add_argument("--labels-topic", help="projects/<p>/topics/<t> to publish labels to (JSON)")
    parser.add_argument("--dead-letter-topic", help="projects/<p>/topics/<t> to publish dead letters to (JSON)")
    parser.add_argument(
        "--message-format",
        choices=["json", "avro"],
        default="json",
        help="Message bodies: JSON events, or Avro binary (schemaless) of the schema version in "
        "the message's schema_version attribute (default: the latest)",
    )
    add_overwrite_flag(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_known_args(argv)


# --- source ------------------------------------------------------------------------------------


def _publish_ms(message) -> int | None:
    t = getattr(message, "publish_time", None)
    if t is None:
        return None
    return int(t.timestamp() * 1000)


class _MessageToRawFn(beam.DoFn):
    """PubsubMessage -> RawRecord (source, payload, arrival_ms); undecodable Avro -> dead letter."""

    UNDECODABLE = "undecodable"

    def __init__(self, fmt: str, registry: SchemaRegistry):
        self._fmt, self._registry = fmt, registry
        self._received = Metrics.counter(METRICS_NS, "messages_received")

    def process(self, message):
        self._received.inc()
        attrs = message.attributes or {}
        source = f"pubsub:{message.message_id or attrs.get('event_id', '?')}"
        arrival = _publish_ms(message)
        if self._fmt == "json":
            yield source, message.data, arrival
            return
        version = attrs.get("schema_version")
        sv = self._registry.get(int(version)) if version and version.isdigit() else self._registry.latest
        try:
            if sv is None:
                raise ValueError(f"schema_version attribute {version!r} is not registered")
            record = fastavro.schemaless_reader(io.BytesIO(message.data), sv.parsed)
        except Exception as e:  # noqa: BLE001 - any decoding failure is this record's dead letter
            yield beam.pvalue.TaggedOutput(
                self.UNDECODABLE,
                dead_letter(
                    contract.SCHEMA_VIOLATION,
                    None,
                    f"Avro body does not decode with schema v{version}: {e}",
                    "read",
                    message.data,
                    source,
                    _NoPII(),
                ),
            )
            return
        record.setdefault("schema_version", sv.version)
        yield source, record, arrival


class _NoPII:
    @staticmethod
    def redact(text):  # undecodable binary: nothing readable to redact, kept as base64
        return text


class ReadEvents(beam.PTransform):
    def __init__(
        self,
        subscription: str | None,
        topic: str | None,
        fmt: str,
        registry: SchemaRegistry,
        timestamp_attribute: str | None,
    ):
        super().__init__()
        self._sub, self._topic, self._fmt, self._registry = subscription, topic, fmt, registry
        self._ts_attr = timestamp_attribute

    def expand(self, pbegin):
        messages = pbegin | "ReadPubSub" >> beam.io.ReadFromPubSub(
            subscription=self._sub, topic=self._topic, with_attributes=True, timestamp_attribute=self._ts_attr
        )
        return messages | "ToRawRecords" >> beam.ParDo(_MessageToRawFn(self._fmt, self._registry)).with_outputs(
            _MessageToRawFn.UNDECODABLE, main="records"
        )


# --- windowed outputs --------------------------------------------------------------------------


def window_fn(spec: WindowSpec):
    if spec.type == "fixed":
        return window.FixedWindows(spec.size)
    if spec.type == "sliding":
        return window.SlidingWindows(spec.size, spec.period)
    return window.Sessions(spec.gap)


def output_windowing(cfg: JobConfig, settings: GraphSettings, label: str, accumulate: bool = False):
    """WindowInto for windowed outputs, from the `time:` section.

    File outputs always discard fired panes (a late pane holds only the late records, so no record is
    written twice); aggregates follow `time.accumulation`. Allowed lateness covers the longest delay
    the graph introduces (per-user buckets, lateness, label deadlines), so no record reaching an
    output is ever dropped by Beam as late.
    """
    t = cfg.time
    # AfterProcessingTime takes whole seconds (a float fails when the trigger is translated).
    early = trigger.AfterProcessingTime(max(1, round(t.early_firing))) if t.early_firing else None
    late = trigger.AfterCount(1) if t.late_firings else None
    mode = (
        trigger.AccumulationMode.ACCUMULATING
        if accumulate and t.accumulation == "accumulating"
        else trigger.AccumulationMode.DISCARDING
    )
    return label >> beam.WindowInto(
        window_fn(t.output_window),
        trigger=trigger.AfterWatermark(early=early, late=late),
        allowed_lateness=settings.max_output_delay_s,
        accumulation_mode=mode,
    )


class _OutputLatencyFn(beam.DoFn):
    """Output - event time (processing clock at the sink minus the record's event/impression time), as
    Beam counters per LATENCY_EDGES_MS bucket (feedback.latency.<output>_output_minus_event_le_<edge>)
    plus a distribution: percentiles can be read off the buckets in the runner's UI or metrics API."""

    def __init__(self, output: str):
        self._output = output
        self._field = "impression_time" if output == "labels" else "event_time"
        self._dist = Metrics.distribution("feedback.latency", f"{output}_output_minus_event_ms")
        names = [f"le_{e}" for e in LATENCY_EDGES_MS] + ["gt_last"]
        self._buckets = [Metrics.counter("feedback.latency", f"{output}_output_minus_event_{n}") for n in names]

    def process(self, record):
        lag = int(time.time() * 1000) - int(record[self._field])
        self._dist.update(lag)
        self._buckets[bucket_index(LATENCY_EDGES_MS, lag)].inc()
        yield record


class _CountersToDict(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, kv):
        acc[kv[0]] = acc.get(kv[0], 0) + kv[1]
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            for k, v in a.items():
                out[k] = out.get(k, 0) + v
        return out

    def extract_output(self, acc):
        return acc


class _QualityRecordFn(beam.DoFn):
    """Per window (and pane): the run summary's fields and the SLOs that counts can decide, with a
    counter of breaches -- the streaming job's periodic quality record."""

    def __init__(self, quality_cfg):
        self._cfg = quality_cfg
        self._breaches = Metrics.counter("feedback.quality", "slo_breaches")
        self._windows = Metrics.counter("feedback.quality", "windows")

    def process(self, counters, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        summary = summarise(counters)
        stats = stats_from_parts(summary, counters, [], [])
        slos = [r for r in evaluate_slos(stats, self._cfg) if r["ok"] is not None]
        failed = [r["slo"] for r in slos if r["ok"] is False]
        self._windows.inc()
        if failed:
            self._breaches.inc(len(failed))
        yield {
            "window_start": win.start.micros // 1000,
            "window_end": win.end.micros // 1000,
            "pane": pane.index if pane else 0,
            "timing": str(pane.timing) if pane else None,
            **summary,
            "slos": slos,
            "breaches": failed,
        }


def _write_windowed_files(out: GraphOutputs, cfg: JobConfig, settings: GraphSettings, output: str) -> dict:
    """Each streaming file output, windowed, under `output`; archive and labels also measure their latency.
    Returns the output collections by name."""
    pcolls = output_collections(out, STREAMING_FILES)
    for o in STREAMING_FILES:
        pcoll = pcolls[o.name]
        if o in (ARCHIVE, LABELS):
            pcoll = pcoll | f"OutputLatency{o.title}" >> beam.ParDo(_OutputLatencyFn(o.name))
        _ = (
            pcoll
            | output_windowing(cfg, settings, f"Window{o.title}")
            | f"Write{o.title}"
            >> WriteWindowedFiles(f"{output.rstrip('/')}/{o.name}", o.name, o.fmt, o.schema_for(settings.clean_schema))
        )
    return pcolls


def _write_counts_and_quality(out: GraphOutputs, cfg: JobConfig, output: str) -> None:
    """The windowed counters, and per window the quality record computed from them."""
    _ = (
        out.counts
        | "CountsToJson" >> beam.MapTuple(counter_record)
        | "WriteCounts" >> WriteWindowedFiles(f"{output.rstrip('/')}/{COUNTS.name}", COUNTS.prefix, COUNTS.fmt)
    )
    _ = (
        out.counts
        | "QualityPerWindow" >> beam.CombineGlobally(_CountersToDict()).without_defaults()
        | "QualityRecord" >> beam.ParDo(_QualityRecordFn(cfg.quality))
        | "WriteQuality" >> WriteWindowedFiles(f"{output.rstrip('/')}/quality", "quality", "jsonl")
    )


def _write_features(features, cfg: JobConfig, settings: GraphSettings, output: str) -> None:
    """Feature rows to the offline files and, when configured, the online store."""
    _ = features | "WriteFeatures" >> WriteOfflineFeatures(
        f"{output.rstrip('/')}/{FEATURES.name}",
        streaming_window=cfg.time.output_window.size,
        allowed_lateness=2 * settings.max_output_delay_s,
    )
    if cfg.online_store is not None:
        _ = features | "OnlineFeatures" >> WriteOnlineFeatures(cfg.online_store)


def _publish(labels, dead, cfg: JobConfig, labels_topic: str | None, dead_letter_topic: str | None) -> None:
    """Labels and dead letters to the Pub/Sub topics given and the Kafka topics configured, if any."""
    if labels_topic:
        _ = (
            labels
            | "LabelsToJson" >> beam.Map(lambda l: to_json_line(l).encode())
            | "PublishLabels" >> beam.io.WriteToPubSub(labels_topic)
        )
    if dead_letter_topic:
        _ = (
            dead
            | "DeadLettersToJson" >> beam.Map(lambda d: to_json_line(d).encode())
            | "PublishDeadLetters" >> beam.io.WriteToPubSub(dead_letter_topic)
        )
    kafka = cfg.kafka
    if kafka is not None and kafka.labels_topic:
        _ = labels | "LabelsToKafka" >> WriteKafkaRecords(kafka, kafka.labels_topic, "label_id")
    if kafka is not None and kafka.dead_letter_topic:
        _ = dead | "DeadLettersToKafka" >> WriteKafkaRecords(kafka, kafka.dead_letter_topic, "source")


def build(
    p: beam.Pipeline,
    cfg: JobConfig,
    settings: GraphSettings,
    raw,
    output: str,
    upstream_dead_letters=(),
    labels_topic: str | None = None,
    dead_letter_topic: str | None = None,
) -> GraphOutputs:
    """Raw records -> shared graph (streaming implementations) -> windowed sinks. Returns the outputs."""
    out = build_event_graph(
        raw,
        settings,
        upstream_dead_letters=list(upstream_dead_letters),
        streaming=True,
        count_windowing=output_windowing(cfg, settings, "WindowCounters"),
    )
    pcolls = _write_windowed_files(out, cfg, settings, output)
    _write_counts_and_quality(out, cfg, output)
    if out.features is not None:
        _write_features(out.features, cfg, settings, output)
    _publish(out.labels, pcolls[DEAD_LETTER.name], cfg, labels_topic, dead_letter_topic)
    return out


STREAMING_OUTPUTS = (*(o.name for o in STREAMING_FILES), COUNTS.name, "quality", FEATURES.name)


def _check_source(args, cfg: JobConfig) -> None:
    """Exactly one source: --subscription, --topic, or the config's `kafka:` section (JSON values only)."""
    pubsub = args.subscription or args.topic
    if cfg.kafka is None and not pubsub:
        raise ConfigError(f"no source: pass --subscription or --topic, or add a kafka: section to {args.config}")
    if cfg.kafka is not None and pubsub:
        raise ConfigError(
            f"two sources: {args.config} has a kafka: section and --subscription/--topic was given; keep one"
        )
    if cfg.kafka is not None and args.message_format != "json":
        raise ConfigError("the Kafka source reads JSON record values: --message-format avro is for Pub/Sub")


def run(argv=None):
    args, beam_args = parse_args(argv)
    cfg = load_config(args.config)
    _check_source(args, cfg)
    settings = GraphSettings.from_config(cfg)
    options = pipeline_options(beam_args, DEFAULT_RUNNER, streaming=True)
    # Continuous windowed files cannot be staged; a used folder is refused as in batch (a restarted job
    # would rewrite the same window file names), and --overwrite replaces a previous run's folder.
    runfolder.prepare_streaming(args.output, args.overwrite, STREAMING_OUTPUTS)
    p = beam.Pipeline(options=options)
    if cfg.kafka is not None:
        records = p | "ReadEvents" >> ReadKafkaRecords(cfg.kafka)
        upstream_dead_letters = []
    else:
        read = p | "ReadEvents" >> ReadEvents(
            args.subscription,
            args.topic,
            args.message_format,
            settings.validation.registry,
            cfg.time.event_time_attribute,
        )
        records, upstream_dead_letters = read.records, [read[_MessageToRawFn.UNDECODABLE]]
    build(p, cfg, settings, records, args.output, upstream_dead_letters, args.labels_topic, args.dead_letter_topic)
    stop = _StopOnSignal()
    result = p.run()
    # Wait in a thread (the DirectRunner's wait_until_finish takes no timeout), so SIGTERM/SIGINT can
    # cancel the job cleanly: the runner stops pulling messages and the process exits 0.
    finished = threading.Event()
    errors = []

    def wait():
        try:
            result.wait_until_finish()
        except Exception as e:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(e)
        finally:
            finished.set()

    threading.Thread(target=wait, name="wait-for-pipeline", daemon=True).start()
    while not finished.wait(0.5):
        if stop.requested:
            _log.info("stop requested: cancelling the streaming job")
            result.cancel()
            return result
    if errors:
        if _cancelled_by_operator(errors[0]):
            # An operator stopped the job from the runner's side (e.g. Flink's REST API or CLI): an
            # ordinary end for a streaming job, not a failure of this process.
            _log.info("the runner reports the job cancelled: %s", str(errors[0]).splitlines()[0][:300])
            return result
        raise errors[0]
    return result


def _cancelled_by_operator(error: Exception) -> bool:
    """Whether the job ended because it was cancelled on the runner. Beam's portable runner reports a Flink
    job cancelled through Flink (REST API, CLI, web UI) as FAILED with Flink's JobCancellationException;
    Beam's own cancel() does not stop a job on the Flink job server (shared/flink-job-server/README.md)."""
    return "JobCancellationException" in str(error)


class _StopOnSignal:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def main(argv=None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
