"""A real, throw-away Apache Kafka broker for tests: one node in KRaft mode (broker and controller in
one JVM, no ZooKeeper), from the Maven Central jars that `.ci/install-kafka` fetches and caches.

    from tests.kafka_broker import kafka_broker   # noqa: F401  (session fixture -> KafkaBroker)

or, outside pytest fixtures, `with run_kafka_broker() as broker: broker.produce_lines(topic, lines)`.

The broker listens on free loopback ports only (a client listener and a controller listener), keeps its
log in a temporary folder formatted with Kafka's own `StorageTool` (a fresh cluster id, a static
one-voter quorum), and is stopped (SIGTERM, then SIGKILL) when the context exits. Topics are created
on first use with `num_partitions` partitions (auto-creation), so producing to a topic creates it.
Records are produced with the kafka-python client (test dependency), byte for byte (Kafka's console
producer decodes its input as UTF-8 and would repair the generator's badly encoded records), each with
its CreateTime set by the producer at send time. A missing JDK or a failed download is a test FAILURE
with the reason, not a skip.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.processes import DIE_WITH_PARENT, free_port, log_tail, stop

_INSTALL_TIMEOUT_S = 10 * 60.0
_START_TIMEOUT_S = 60.0
_PRODUCE_TIMEOUT_S = 120.0
_HEAP = "-Xmx512m"
_READY_LINE = "Kafka Server started"  # KafkaRaftServer logs it once the broker serves clients


class KafkaUnavailable(RuntimeError):
    """Java is missing, the jars did not download, or the broker did not start; the message says why."""


def kafka_libs() -> str:
    """The folder of the broker's jars (.ci/install-kafka: fetched once, then cached)."""
    cmd = ["bash", str(ROOT / ".ci" / "install-kafka")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KafkaUnavailable(f"{' '.join(cmd)} did not finish in {_INSTALL_TIMEOUT_S:.0f}s") from None
    if proc.returncode != 0:
        raise KafkaUnavailable(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    libs = values.get("KAFKA_LIBS", "")
    if not os.path.isdir(libs):
        raise KafkaUnavailable(f".ci/install-kafka printed KAFKA_LIBS={libs!r}, which is not a folder")
    return libs


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KafkaUnavailable("java is not on PATH: the Kafka broker needs a JDK 11+ (17 is used here)")
    return java


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (as `kafka-storage random-uuid`)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@dataclasses.dataclass
class KafkaBroker:
    """One running single-node KRaft cluster. `bootstrap` is the client address ("127.0.0.1:PORT")."""

    libs: str
    workdir: Path
    num_partitions: int = 2
    port: int = 0
    controller_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    def _classpath(self) -> str:
        return os.path.join(self.libs, "*")

    def _write_config(self) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "true",
            # One node: every internal topic has one replica, and consumer groups start at once.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        path = self.workdir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j = self.workdir / "log4j.properties"
        log4j.write_text(
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.server.KafkaConfig=WARN\n"
            "log4j.logger.org.apache.kafka.common.config.AbstractConfig=WARN\n"
        )
        return path

    def _jvm(self, main: str, *args: str) -> list:
        return [
            _java(),
            _HEAP,
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-cp",
            self._classpath(),
            main,
            *args,
        ]

    def start(self) -> KafkaBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.controller_port = self.port or free_port(), self.controller_port or free_port()
        config = self._write_config()
        fmt = subprocess.run(
            self._jvm("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config)),
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
        )
        if fmt.returncode != 0:
            raise KafkaUnavailable(
                f"kafka StorageTool format failed (exit {fmt.returncode}):\n{fmt.stdout}{fmt.stderr}"
            )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self._jvm("kafka.Kafka", str(config)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=DIE_WITH_PARENT,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise KafkaUnavailable(f"the Kafka broker exited (code {self.process.returncode}):\n{self.log_tail()}")
            if _READY_LINE in self.log_path.read_text(errors="replace") and _listening(self.port):
                return self
            time.sleep(0.2)
        self.stop()
        raise KafkaUnavailable(f"the Kafka broker did not start within {_START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def produce_lines(self, topic: str, lines: list[bytes]) -> list[tuple[int, int]]:
        """Every line as one record (no key, value = the bytes as given), acks=all; returns each record's
        (partition, offset) in order. When this returns, every record is in the topic's log."""
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, retries=5)
        try:
            futures = [producer.send(topic, value=line) for line in lines]
            producer.flush(_PRODUCE_TIMEOUT_S)
            meta = [f.get(timeout=_PRODUCE_TIMEOUT_S) for f in futures]
        finally:
            producer.close(timeout=10)
        return [(m.partition, m.offset) for m in meta]

    def read_topic(self, topic: str, timeout: float = 30.0) -> list:
        """Every record in the topic now (all partitions, from the beginning), as kafka-python
        ConsumerRecords; [] when the topic does not exist yet. No consumer group, nothing committed."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,
        )
        try:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                return []
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            records, deadline = [], time.monotonic() + timeout
            while any(consumer.position(tp) < end[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"reading {topic} to its end offsets {end} took over {timeout:.0f}s")
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(r for r in batch if r.offset < end[TopicPartition(r.topic, r.partition)])
            return records
        finally:
            consumer.close()

    def log_tail(self, limit: int = 4000) -> str:
        return log_tail(self.log_path, limit)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=20)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def run_kafka_broker(num_partitions: int = 2) -> Iterator[KafkaBroker]:
    """Fetch (if needed) and start a broker on free loopback ports; yield it; stop it on exit."""
    libs = kafka_libs()
    with tempfile.TemporaryDirectory(prefix="kafka-broker-") as workdir:
        broker = KafkaBroker(libs, Path(workdir), num_partitions=num_partitions)
        try:
            yield broker.start()
        finally:
            broker.stop()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A Kafka broker shared by the test session; tests use their own topic names."""
    stack = contextlib.ExitStack()
    try:
        broker = stack.enter_context(run_kafka_broker())
    except KafkaUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    with stack:
        yield broker
