"""The Kafka source's and sinks' pure parts and the streaming job's source check, without a broker
(tests/test_kafka_e2e.py runs them against a real one on Flink)."""

import json
import types

import pytest

from pipelines import streaming
from transforms.config import ConfigError, config_from_dict
from transforms.kafka_io import KafkaConfig, kafka_record, raw_record_from_kafka

KAFKA = {"bootstrap_servers": "127.0.0.1:9092", "topic": "events", "expansion_service": "localhost:8097"}


def _row(**fields):
    base = {"topic": "events", "partition": 1, "offset": 42, "key": None, "value": b'{"a":1}', "timestamp": 1700}
    return types.SimpleNamespace(**{**base, **fields})


def test_raw_record_names_the_record_and_keeps_its_timestamp():
    assert raw_record_from_kafka(_row()) == ("kafka:events/1/42", b'{"a":1}', 1700)


@pytest.mark.parametrize("timestamp", [None, -1])
def test_a_record_without_timestamp_has_no_arrival_time(timestamp):
    assert raw_record_from_kafka(_row(timestamp=timestamp))[2] is None


def test_a_null_value_is_an_empty_payload():
    assert raw_record_from_kafka(_row(value=None))[1] == b""


def test_kafka_record_is_keyed_json():
    key, value = kafka_record({"label_id": "l1", "label": 1}, "label_id")
    assert key == b"l1" and json.loads(value) == {"label": 1, "label_id": "l1"}


def test_consumer_and_producer_properties():
    cfg = KafkaConfig(**KAFKA, group_id="g", consumer_config={"security.protocol": "SSL"})
    assert cfg.consumer_properties() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "auto.offset.reset": "earliest",
        "group.id": "g",
        "security.protocol": "SSL",
    }
    assert cfg.producer_properties() == {"bootstrap.servers": "127.0.0.1:9092"}


def test_config_section_is_validated():
    assert config_from_dict({"kafka": KAFKA}).kafka.topic == "events"
    assert config_from_dict({}).kafka is None
    with pytest.raises(ConfigError, match="kafka.start"):
        config_from_dict({"kafka": {**KAFKA, "start": "beginning"}})
    with pytest.raises(ConfigError, match="kafka.topics: unknown key"):
        config_from_dict({"kafka": {**KAFKA, "topics": ["a"]}})
    with pytest.raises(ConfigError, match="kafka.bootstrap_servers: required key is missing"):
        config_from_dict({"kafka": {"topic": "events"}})


@pytest.mark.parametrize(
    "argv,kafka,error",
    [
        ([], False, "no source"),
        (["--subscription", "projects/p/subscriptions/s"], True, "two sources"),
        (["--message-format", "avro"], True, "JSON record values"),
        (["--subscription", "projects/p/subscriptions/s"], False, None),
        ([], True, None),
    ],
)
def test_exactly_one_source(argv, kafka, error):
    args, _ = streaming.parse_args(["--config", "job.yaml", "--output", "out", *argv])
    cfg = config_from_dict({"kafka": KAFKA} if kafka else {})
    if error is None:
        streaming._check_source(args, cfg)
    else:
        with pytest.raises(ConfigError, match=error):
            streaming._check_source(args, cfg)
