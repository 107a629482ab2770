"""The streaming job end to end on Flink, reading a real Kafka broker: Kafka -> Flink -> files.

A single-node Kafka broker in KRaft mode (tests/kafka_broker.py) holds the generator's records, produced
with Kafka's own Java producer. Beam's Flink job server (tests/engines.py's jar, embedded Flink:
`--flink-master=[local]`) runs `python -m pipelines.streaming` (a subprocess, `--environment_type=LOOPBACK`
for the Python steps), which reads the topic with Beam's cross-language ReadFromKafka. Its Java half is
expanded by a separate Java expansion service with an EMBEDDED environment (the Java SDK harness runs
inside the job server's JVM: no Docker) and `--experiments=use_deprecated_read` (KafkaIO's legacy
UnboundedSource reader: the splittable-DoFn one delivered nothing downstream on Flink without
checkpointing; shared/flink-job-server/README.md). Labels and dead letters go to Kafka topics too (Beam's
cross-language WriteToKafka, same expansion service), read back with kafka-python; they and every other
output (the job's windowed files) are compared with the generator's ground truth record by record.

Stopping. Beam's PipelineResult.cancel() does not stop a Flink job on this job server (the job server's
invocation future is cancelled, the Flink job is not), so the test cancels the Flink job through Flink's
REST API (the embedded Flink's REST port is pinned by a --flink-conf-dir) and expects the job process
to exit 0 on its own; then it stops the job server, the expansion service and the broker.

Time. As in tests/test_pubsub_e2e.py: the source's watermark is the processing clock (KafkaIO's
ProcessingTime policy) and the job's too-late rule compares the Kafka record timestamp (set by the
producer) with the event time, so the events are generated around now, inside one `sessions.split_every`
bucket, with short event-time rules (1 min). PROCESSING_BUDGET covers the job's start-up on Flink and
reading every record before that bucket is released.

Delivery. KafkaIO's reader on Flink without checkpointing is at-least-once in general (a restart would
read from the last committed offsets); a clean run reads each record once, which the exact counts below
rely on: a lost or a repeated record fails them. Each dead letter names its record ("kafka:<topic>/
<partition>/<offset>").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SCHEMA_DIR
from tests.engines import flink_job_server_jar  # noqa: F401  (session fixture)
from tests.helpers import count_files, event_lines, iso_seconds, read_output, slate_items
from tests.kafka_broker import kafka_broker  # noqa: F401  (session fixture)
from tests.processes import DIE_WITH_PARENT, free_port, log_tail, stop

pytestmark = pytest.mark.slow

TOPIC = "feedback-events"
LABELS_TOPIC = "feedback-labels"
DEAD_LETTER_TOPIC = "feedback-dead-letters"
N_EVENTS = 1500
SEED = 11
# Event-time rules of the job, in seconds (config/streaming.yaml has 1 h, 1 h, 30 min, 5 min), as short as
# the config allows, so every output is due within ~2 min of the last event: a user's run closes at most
# max_run_duration + lateness (90 s) behind the watermark, a label settles max(window, lateness) after
# its impression plus that delay (120 s), its slate a session gap (10 s) later.
LATENESS = 30  # time.lateness
SPLIT_EVERY = 60  # sessions.split_every: the job releases a user's events at bucket end + LATENESS
LABEL_WINDOW = 30  # labels.window
OUTPUT_WINDOW = 60  # time.output_window
RUN_CAP = 60  # bots.session_gap, bots.max_run_duration and bots.cadence_min_duration (their minimum)
# The generator's users all arrive within ~7 s, so N_EVENTS span ~50 s of event time (checked).
GENERATOR_KNOBS = {"duration_hours": 0.002, "bot_rule_split": {"crawler_user_agent": 1.0}}
# Seconds between planning the event times and producing the last record (generation, ~3 s, and
# production, ~2 s): the first event must not be too late (LATENESS) by its Kafka timestamp.
PRODUCE_MARGIN = 12
# The events span ~48 s: they may start up to this far into their 60 s bucket and still end inside it.
START_SLACK = 10
# Wall-clock seconds the job has at least to start on Flink and read every record before the bucket is
# released (measured: the Flink job runs ~25 s after the job process starts and reads 1500 records in a
# few seconds).
PROCESSING_BUDGET = 60
START_TIMEOUT_S = 90
JOB_STOP_TIMEOUT_S = 60
OUTPUT_NAMES = (
    "archive",
    "bots",
    "labels",
    "slates",
    "dead_letter",
    "orphan_outcomes",
    "late_outcomes",
    "duplicates",
    "consent_dropped",
)
# Flink on Java 17 needs these module openings; the job server's launcher jar carries them in its manifest.
EXPANSION_SERVICE_MAIN = "org.apache.beam.sdk.expansion.service.ExpansionService"


# --- the plan (as in tests/test_pubsub_e2e.py, with this job's budget) ----------------------------------


def plan_times(now: float) -> tuple[float, float]:
    """(start of the events, release time), both epoch seconds.

    Every event falls in the `split_every` bucket [B, B + SPLIT_EVERY) (one bucket, so no user's activity
    or label is split across two), which the job releases at B + SPLIT_EVERY + LATENESS (the watermark is
    the processing clock). The first event is at most LATENESS - PRODUCE_MARGIN before now, so no record
    is too late by its Kafka timestamp (as in the truth: nothing too late); within that, the events start
    as early as the bucket grid allows (up to START_SLACK into their bucket, since they span less than it),
    and the release leaves the job at least PROCESSING_BUDGET.
    """
    earliest = now - LATENESS + PRODUCE_MARGIN
    bucket = math.ceil((earliest - START_SLACK) / SPLIT_EVERY) * SPLIT_EVERY
    start = max(bucket + 1.0, earliest)
    release = bucket + SPLIT_EVERY + LATENESS
    assert start <= bucket + START_SLACK and release - now >= PROCESSING_BUDGET
    return start, release


def job_config(path: Path, bootstrap: str, expansion_service: str) -> Path:
    """config/streaming.yaml with the short event-time rules above and a kafka: source."""
    cfg = yaml.safe_load((ROOT / "config" / "streaming.yaml").read_text())
    cfg["schema"]["directory"] = str(SCHEMA_DIR)
    cfg.pop("online_store", None)
    # Early panes every 5 s instead of 30 s: the last outputs (slates) reach their files sooner.
    cfg["time"].update(
        lateness=f"{LATENESS}s", early_firing="5s", output_window={"type": "fixed", "size": f"{OUTPUT_WINDOW}s"}
    )
    cfg["sessions"] = {"gap": f"{LATENESS}s", "split_every": f"{SPLIT_EVERY}s"}
    run_cap = f"{RUN_CAP}s"
    cfg["bots"] = {"session_gap": run_cap, "max_run_duration": run_cap, "cadence_min_duration": run_cap}
    cfg["labels"]["window"] = f"{LABEL_WINDOW}s"
    cfg["kafka"] = {
        "bootstrap_servers": bootstrap,
        "topic": TOPIC,
        "start": "earliest",
        "expansion_service": expansion_service,
        "labels_topic": LABELS_TOPIC,
        "dead_letter_topic": DEAD_LETTER_TOPIC,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_events(path: Path, start: float, monkeypatch) -> dict:
    from feedback_tools import generate as gen

    monkeypatch.setattr(gen, "LABEL_WINDOW_MS", LABEL_WINDOW * 1000)
    iso = dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    truth = gen.generate(N_EVENTS, str(path), seed=SEED, start=iso, lateness_s=LATENESS, **GENERATOR_KNOBS)
    lo, hi = (iso_seconds(t) for t in truth["event_time_range"])
    bucket = math.floor(start / SPLIT_EVERY) * SPLIT_EVERY
    assert bucket <= lo and hi < bucket + SPLIT_EVERY, f"the events span {truth['event_time_range']}"
    assert truth["counts"]["too_late"] == 0
    return truth


# --- Java services: the expansion service and the job server with embedded Flink --------------------------


class JavaService:
    """A Java server process on a free loopback port, its log in `workdir`."""

    def __init__(self, name: str, cmd: list, workdir: Path, port: int):
        self.name, self.port, self.log_path = name, port, workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=DIE_WITH_PARENT
            )

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited (code {self.process.returncode}):\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"{self.name} did not listen on {self.port} within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, limit: int = 4000) -> str:
        return log_tail(self.log_path, limit)

    def stop(self) -> None:
        stop(self.process, timeout=20)


def start_expansion_service(jar: str, workdir: Path) -> JavaService:
    port = free_port()
    cmd = [
        "java",
        "-Xmx512m",
        "-cp",
        jar,  # the launcher jar's manifest Class-Path names the job server's jars, KafkaIO among them
        EXPANSION_SERVICE_MAIN,
        str(port),
        "--defaultEnvironmentType=EMBEDDED",
        "--experiments=use_deprecated_read",
    ]
    return JavaService("expansion-service", cmd, workdir, port)


class FlinkJobServer(JavaService):
    """Beam's Flink job server running an embedded Flink whose REST API listens on a known port."""

    def __init__(self, jar: str, workdir: Path):
        self.rest_port = free_port()
        conf = workdir / "flink-conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "rest.address": "localhost",
                    "rest.bind-address": "localhost",
                    "rest.port": self.rest_port,
                    "parallelism.default": 1,
                }
            )
        )
        port = free_port()
        cmd = [
            "java",
            "-Xmx1500m",
            "-jar",
            jar,
            "--flink-master=[local]",
            f"--flink-conf-dir={conf}",
            f"--job-port={port}",
            "--artifact-port=0",
            "--expansion-port=0",
        ]
        super().__init__("flink-job-server", cmd, workdir, port)

    @property
    def endpoint(self) -> str:
        return f"localhost:{self.port}"

    def _rest(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://localhost:{self.rest_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def running_jobs(self) -> list[str]:
        try:
            jobs = self._rest("/jobs/overview")["jobs"]
        except (urllib.error.URLError, ConnectionError, OSError):
            return []  # no Flink job yet: the embedded cluster starts with the first job
        return [j["jid"] for j in jobs if j["state"] in ("CREATED", "INITIALIZING", "RUNNING", "RESTARTING")]

    def cancel_all(self) -> list[str]:
        """Cancel every running Flink job through the REST API; returns their ids."""
        jids = self.running_jobs()
        for jid in jids:
            self._rest(f"/jobs/{jid}?mode=cancel", method="PATCH")
        return jids


# --- the test, step by step -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Services:
    """The Java expansion service and the Flink job server of one test."""

    expansion: JavaService
    job_server: FlinkJobServer

    @property
    def all(self) -> tuple[JavaService, ...]:
        return (self.expansion, self.job_server)

    def stop(self) -> None:
        for s in reversed(self.all):
            s.stop()


@pytest.fixture
def java_services(flink_job_server_jar, tmp_path):
    """Started before the test body: the JVMs boot while the events are planned, generated and produced.
    The test stops them before its assertions; this stops them too if the test failed first."""
    expansion = start_expansion_service(flink_job_server_jar, tmp_path)
    try:
        services = Services(expansion, FlinkJobServer(flink_job_server_jar, tmp_path))
    except BaseException:
        expansion.stop()
        raise
    try:
        yield services
    finally:
        services.stop()


@dataclasses.dataclass(frozen=True)
class Produced:
    """The (partition, offset) of every produced record, and the clock around the production."""

    offsets: list
    produced_from: dt.datetime
    produced_until: dt.datetime


def produce_events(broker, lines: list[bytes], start: float) -> Produced:
    produced_from = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    offsets = broker.produce_lines(TOPIC, lines)
    produced_until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    assert len(set(offsets)) == N_EVENTS
    assert produced_until.timestamp() - start < LATENESS, "the first record is too late: raise PRODUCE_MARGIN"
    return Produced(offsets, produced_from, produced_until)


def start_job(config: Path, out: Path, log_path: Path, job_server: FlinkJobServer) -> subprocess.Popen:
    """`python -m pipelines.streaming` on the job server (LOOPBACK for its Python steps)."""
    cmd = [
        sys.executable,
        "-m",
        "pipelines.streaming",
        "--config",
        str(config),
        "--output",
        str(out),
        "--runner=PortableRunner",
        f"--job_endpoint={job_server.endpoint}",
        "--environment_type=LOOPBACK",
        "--parallelism=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=DIE_WITH_PARENT,
        )


@dataclasses.dataclass
class JobRun:
    """How long the Flink job ran and how it stopped."""

    waited_s: float = float("nan")
    cancelled: list = dataclasses.field(default_factory=list)
    code: int | None = None
    stop_s: float = float("nan")


def outputs_complete(broker, out: Path, truth: dict) -> bool:
    """Every label, dead letter, archived event and slate item the truth predicts is in the files, and
    every label and dead letter on its topic."""
    expected_dead = sum(truth["dead_letter_by_reason"].values())
    file_labels = read_output(out, "labels")
    complete = (
        len(file_labels) == truth["labels"]["exposures"]
        and len(read_output(out, "dead_letter")) == expected_dead
        and len(read_output(out, "archive")) == truth["counts"]["valid"]
        and slate_items(read_output(out, "slates"))
        == sorted((l["request_id"], l["item_id"]) for l in file_labels if l["request_id"] is not None)
    )
    if not complete:
        return False
    # The files are all there: are the topics too?
    topic_state = (len(broker.read_topic(LABELS_TOPIC)), len(broker.read_topic(DEAD_LETTER_TOPIC)))
    return topic_state == (truth["labels"]["exposures"], expected_dead)


def wait_for_outputs(job, job_server: FlinkJobServer, broker, out: Path, log_path: Path, truth, release, due) -> float:
    """Waits past the release time until everything expected is out (and 5 s without a new file), at most
    until every output is due by the job's own bound; returns the seconds the Flink job ran."""
    state, changed_at, started_at = None, time.time(), None
    while True:
        assert job.poll() is None, f"the job exited early (code {job.returncode}); log:\n{log_tail(log_path, 6000)}"
        now = time.time()
        if started_at is None and job_server.running_jobs():
            started_at = now
        new_state = count_files(out, OUTPUT_NAMES)
        if new_state != state:
            state, changed_at = new_state, now
        complete = outputs_complete(broker, out, truth)
        if (complete and now > release and now - changed_at > 5) or now > due + 30:
            return time.time() - (started_at or time.time())
        time.sleep(2)


def stop_job(job_server: FlinkJobServer, job: subprocess.Popen) -> tuple[list, int | None, float]:
    """Flink's REST cancel, then the job process ends by itself: (cancelled job ids, exit code or None if
    it did not exit in time, seconds it took)."""
    stop_at = time.monotonic()
    cancelled = job_server.cancel_all()
    try:
        code = job.wait(JOB_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    return cancelled, code, time.monotonic() - stop_at


def run_job(broker, services: Services, truth: dict, release: float, tmp_path: Path) -> JobRun:
    """Runs the job until its outputs are complete (or overdue), cancels it, then stops the Java services."""
    job = None
    log_path = tmp_path / "job.log"
    run = JobRun()
    try:
        services.expansion.wait_listening()
        services.job_server.wait_listening()
        config = job_config(tmp_path / "job.yaml", broker.bootstrap, f"localhost:{services.expansion.port}")
        from pipelines.graph import GraphSettings
        from transforms.config import load_config

        # The job's own bound on how far behind the watermark (here: the processing clock) its outputs can be.
        due = (
            iso_seconds(truth["event_time_range"][1])
            + GraphSettings.from_config(load_config(str(config))).max_output_delay_s
        )
        job = start_job(config, tmp_path / "out", log_path, services.job_server)
        run.waited_s = wait_for_outputs(
            job, services.job_server, broker, tmp_path / "out", log_path, truth, release, due
        )
        run.cancelled, run.code, run.stop_s = stop_job(services.job_server, job)
    finally:
        if job is not None and job.poll() is None:
            stop(job, timeout=20)
        services.stop()
    return run


def assert_dead_letters(outputs: dict, published_dead: list, truth: dict, offsets: list) -> None:
    """Every reason the truth predicts, with its count; each names a distinct Kafka record. The same dead
    letters were written to their topic once each, keyed by their source."""
    predicted = Counter({r: n for r, n in truth["dead_letter_by_reason"].items() if n})
    assert Counter(d["reason"] for d in outputs["dead_letter"]) == predicted
    sources = [d["source"] for d in outputs["dead_letter"]]
    assert len(set(sources)) == len(sources)
    produced = {f"kafka:{TOPIC}/{partition}/{offset}" for partition, offset in offsets}
    assert set(sources) <= produced, sorted(set(sources) - produced)[:5]
    dead_values = [json.loads(r.value) for r in published_dead]
    assert Counter(d["reason"] for d in dead_values) == predicted
    assert sorted(d["source"] for d in dead_values) == sorted(sources)
    assert all(r.key.decode() == d["source"] for r, d in zip(published_dead, dead_values))


def assert_every_event_accounted(outputs: dict, truth: dict, produced: Produced) -> None:
    """Every valid event archived once (a clean run reads each record once), every other event in its
    outcome, by event id."""
    counts = truth["counts"]
    archive = outputs["archive"]
    assert len(archive) == counts["valid"]
    assert len({e["event_id"] for e in archive}) == len(archive)
    assert Counter(e["event_type"] for e in archive) == Counter(
        {t: n for t, n in truth["valid_event_count_by_type"].items() if n}
    )
    # Arrival time is the Kafka record's timestamp: the producer's clock (this machine's) at send time.
    assert all(produced.produced_from <= e["arrival_time"] <= produced.produced_until for e in archive)

    assert sorted(e["event_id"] for e in outputs["bots"]) == sorted(truth["bot_event_ids"])
    assert Counter(e["bot_rule"] for e in outputs["bots"]) == Counter(
        {r: n for r, n in truth["bots_by_rule"].items() if n}
    )
    assert Counter(d["event_id"] for d in outputs["duplicates"]) == Counter(truth["duplicate_event_ids"])
    assert sorted(c["event_id"] for c in outputs["consent_dropped"]) == sorted(truth["consent_dropped_event_ids"])
    accounted = (
        len(archive)
        + len(outputs["bots"])
        + len(outputs["duplicates"])
        + len(outputs["dead_letter"])
        + len(outputs["consent_dropped"])
    )
    assert accounted == N_EVENTS


def assert_labels(outputs: dict, published_labels: list, truth: dict) -> None:
    """One label per exposure, exactly once in the files and on the topic (keyed by label_id), positives
    as the truth."""
    labels = outputs["labels"]
    label_truth = truth["labels"]
    assert len(labels) == label_truth["exposures"] == len(published_labels)
    assert len({l["label_id"] for l in labels}) == len(labels)
    label_values = [json.loads(r.value) for r in published_labels]
    assert sorted(l["label_id"] for l in label_values) == sorted(l["label_id"] for l in labels)
    assert all(r.key.decode() == l["label_id"] for r, l in zip(published_labels, label_values))
    assert sorted(l["label_id"] for l in label_values if l["label"]) == label_truth["positive_label_ids"]
    assert sorted(l["label_id"] for l in labels if l["label"]) == label_truth["positive_label_ids"]
    assert sum(l["label"] == 0 for l in labels) == label_truth["negatives"]
    for kind in ("click", "add_to_cart", "purchase"):
        assert sum(kind in l["outcome_types"] for l in labels) == label_truth["by_outcome"][kind], kind
    assert len(outputs["orphan_outcomes"]) == label_truth["orphan_outcomes"]
    assert len(outputs["late_outcomes"]) == label_truth["late_outcomes"] == 0


def assert_slates(outputs: dict) -> None:
    """Every label with a request_id, in exactly one slate per request."""
    slates = outputs["slates"]
    expected_items = sorted((l["request_id"], l["item_id"]) for l in outputs["labels"] if l["request_id"] is not None)
    assert expected_items and slate_items(slates) == expected_items
    assert len({s["request_id"] for s in slates}) == len(slates), "a request is split over several slates"


@pytest.mark.timeout(480)
def test_streaming_job_reads_kafka_on_flink(kafka_broker, java_services, tmp_path, monkeypatch):
    t_begin = time.monotonic()
    planned_at = time.time()
    start, release = plan_times(planned_at)
    truth = make_events(tmp_path / "events.jsonl", start, monkeypatch)
    produced = produce_events(kafka_broker, event_lines(tmp_path / "events.jsonl", N_EVENTS), start)
    run = run_job(kafka_broker, java_services, truth, release, tmp_path)
    out = tmp_path / "out"
    job_log = log_tail(tmp_path / "job.log", 6000)
    print(
        f"\nkafka e2e: events start {start - planned_at:+.0f}s from planning, produced "
        f"{produced.produced_until.timestamp() - 1 - planned_at:.0f}s after it; {N_EVENTS} records; Flink job ran "
        f"{run.waited_s:.0f}s; cancelled {run.cancelled}; job exited {run.stop_s:.1f}s after the cancel; "
        f"{count_files(out, OUTPUT_NAMES)} output files; test {time.monotonic() - t_begin:.0f}s",
        file=sys.stderr,
    )
    assert len(run.cancelled) == 1, f"expected one running Flink job, cancelled {run.cancelled}"
    assert run.code == 0, (
        f"the job did not exit 0 within {JOB_STOP_TIMEOUT_S}s of the cancel (code {run.code}):\n{job_log}"
    )
    assert not any(s.process.poll() is None for s in java_services.all)
    published_labels = kafka_broker.read_topic(LABELS_TOPIC)
    published_dead = kafka_broker.read_topic(DEAD_LETTER_TOPIC)

    outputs = {name: read_output(out, name) for name in OUTPUT_NAMES}
    assert_dead_letters(outputs, published_dead, truth, produced.offsets)
    assert_every_event_accounted(outputs, truth, produced)
    assert_labels(outputs, published_labels, truth)
    assert_slates(outputs)
