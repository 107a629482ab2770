"""Kafka as the streaming job's event source, through Beam's cross-language `ReadFromKafka` (Java KafkaIO).

Selected by the `kafka:` section of the job config (config/streaming.yaml documents it). Each Kafka
record's value is one event (JSON); its Kafka timestamp (the producer's CreateTime, or LogAppendTime
when the topic says so) is the arrival time, as the publish time is for Pub/Sub. The element timestamps
and the watermark follow the processing clock (KafkaIO's ProcessingTime policy, like Pub/Sub on the
DirectRunner): the graph stamps event time itself and judges lateness by arrival time.

`ReadFromKafka` expands in a Java expansion service and runs in a Java SDK environment. Without Docker
(this project's machines), point `expansion_service` at a service started with an EMBEDDED environment,
which runs the Java half inside the Flink job server's JVM:

    java -cp <flink job server classpath> org.apache.beam.sdk.expansion.service.ExpansionService PORT \
        --defaultEnvironmentType=EMBEDDED --experiments=use_deprecated_read

`use_deprecated_read` selects KafkaIO's legacy UnboundedSource reader: the splittable-DoFn reader read
the topic but delivered nothing downstream on Flink without checkpointing (shared/flink-job-server/README.md).
With `expansion_service: null`, Beam's default applies (it downloads Beam's IO expansion service jar and
starts it with a Docker environment).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka, WriteToKafka
from apache_beam.metrics import Metrics
from pydantic import Field

from transforms.configbase import _Section
from transforms.io import to_json_line
from transforms.parse import RawRecord

__all__ = ["KafkaConfig", "ReadKafkaRecords", "WriteKafkaRecords", "raw_record_from_kafka", "kafka_record"]

METRICS_NS = "feedback.kafka"
SOURCE_PREFIX = "kafka:"


class KafkaConfig(_Section):
    bootstrap_servers: str = Field(min_length=1, description="host:port[,host:port...] of the Kafka brokers.")
    topic: str = Field(min_length=1, description="Topic holding the events, one JSON event per record value.")
    group_id: str | None = Field(None, description="Consumer group (group.id); None: KafkaIO's own, no commits.")
    start: str = Field(
        "earliest",
        pattern="^(earliest|latest)$",
        description="Where a new consumer starts (auto.offset.reset): earliest or latest.",
    )
    expansion_service: str | None = Field(
        None,
        description="host:port of the Java expansion service for ReadFromKafka; None: Beam's default (Docker).",
    )
    consumer_config: dict[str, str] = Field(
        default_factory=dict, description="More Kafka consumer properties (security.protocol, sasl.*, ...)."
    )
    labels_topic: str | None = Field(None, description="Topic to write labels to (JSON, keyed by label_id).")
    dead_letter_topic: str | None = Field(None, description="Topic to write dead letters to (JSON, keyed by source).")
    producer_config: dict[str, str] = Field(
        default_factory=dict, description="More Kafka producer properties for the label and dead-letter topics."
    )

    def consumer_properties(self) -> dict[str, str]:
        props = {"bootstrap.servers": self.bootstrap_servers, "auto.offset.reset": self.start}
        if self.group_id:
            props["group.id"] = self.group_id
        return {**props, **self.consumer_config}

    def producer_properties(self) -> dict[str, str]:
        return {"bootstrap.servers": self.bootstrap_servers, **self.producer_config}


def raw_record_from_kafka(record) -> RawRecord:
    """A KafkaIO record with metadata (a Row: topic, partition, offset, value, timestamp, ...) -> RawRecord
    (source "kafka:<topic>/<partition>/<offset>", value bytes, Kafka timestamp in ms or None)."""
    ts = record.timestamp
    arrival = int(ts) if ts is not None and ts >= 0 else None
    return f"{SOURCE_PREFIX}{record.topic}/{record.partition}/{record.offset}", bytes(record.value or b""), arrival


class _ToRawRecordFn(beam.DoFn):
    def __init__(self):
        self._received = Metrics.counter(METRICS_NS, "records_received")

    def process(self, record):
        self._received.inc()
        yield raw_record_from_kafka(record)


class ReadKafkaRecords(beam.PTransform):
    """Kafka topic -> RawRecord PCollection (unbounded).

    Args:
      cfg: the job config's `kafka:` section.
    """

    def __init__(self, cfg: KafkaConfig):
        super().__init__()
        if not isinstance(cfg, KafkaConfig):
            raise TypeError(f"cfg must be a KafkaConfig, got {type(cfg).__name__}")
        self._cfg = cfg

    def expand(self, pbegin):
        rows = pbegin | "ReadKafka" >> ReadFromKafka(
            consumer_config=self._cfg.consumer_properties(),
            topics=[self._cfg.topic],
            with_metadata=True,
            timestamp_policy=ReadFromKafka.processing_time_policy,
            expansion_service=self._cfg.expansion_service,
        )
        return rows | "ToRawRecords" >> beam.ParDo(_ToRawRecordFn())


def kafka_record(record: dict, key_field: str) -> tuple[bytes, bytes]:
    """An output record -> (key, value) bytes for Kafka: the key field's value, and the record as JSON."""
    return str(record[key_field]).encode(), to_json_line(record).encode()


class WriteKafkaRecords(beam.PTransform):
    """Output records (dicts) -> a Kafka topic, one JSON value per record, keyed by `key_field`, through
    Beam's cross-language WriteToKafka (the same expansion service as the source). Delivery is KafkaIO's
    default (at least once across restarts; each record once in a run without failures).

    Args:
      cfg: the job config's `kafka:` section (brokers, producer properties, expansion service).
      topic: the topic to write.
      key_field: the record field whose value is the Kafka key (e.g. label_id).
    """

    def __init__(self, cfg: KafkaConfig, topic: str, key_field: str):
        super().__init__()
        if not topic:
            raise ValueError("topic must be a non-empty topic name")
        self._cfg, self._topic, self._key_field = cfg, topic, key_field

    def expand(self, records):
        return (
            records
            | "ToKafkaRecord" >> beam.Map(kafka_record, self._key_field).with_output_types(tuple[bytes, bytes])
            | "WriteKafka"
            >> WriteToKafka(
                producer_config=self._cfg.producer_properties(),
                topic=self._topic,
                expansion_service=self._cfg.expansion_service,
            )
        )
