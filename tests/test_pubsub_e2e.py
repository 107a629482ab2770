"""The streaming job end to end against a real Pub/Sub emulator (tests/pubsub_emulator.py).

The official google-cloud-pubsub client creates the topics and subscriptions and publishes the
generator's records; `python -m pipelines.streaming` runs as a subprocess on the BundleBasedDirectRunner,
reading the events subscription and publishing labels and dead letters to their topics, both through
PUBSUB_EMULATOR_HOST. The test pulls what the job published, reads its files, compares both with the
generator's ground truth, then stops the job with SIGTERM and expects a clean exit (code 0).

Time. The DirectRunner's Pub/Sub watermark is the wall clock and the job's too-late rule compares the
publish time with the event time, so the events are generated around now, all inside one
`sessions.split_every` bucket, with every label and window due a few minutes later (`plan_times`). The
job config shrinks the event-time rules accordingly (lateness, buckets, label and output windows 1 min);
the generator's label truth is computed with the same window (`make_events`). One bucket on purpose:
the behavioural bot rules need whole activity runs, and every label then comes due at about one time.

Delivery. The DirectRunner pulls 10 messages at a time and acknowledges each pull before processing it:
at-most-once (a job killed with SIGKILL lost the 10 messages of its last pull: acknowledged, never
output). A clean run delivers each message once, which the exact counts below rely on: a lost or a
repeated message fails them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from pipelines.graph import GraphSettings
from tests.conftest import ROOT, SCHEMA_DIR
from tests.helpers import count_files, event_lines, iso_seconds, read_output, slate_items
from tests.pubsub_emulator import pubsub_emulator  # noqa: F401  (session fixture)
from transforms.config import load_config

pytestmark = pytest.mark.slow

PROJECT = "feedback-e2e"
N_EVENTS = 1500
SEED = 11
RUNNER = "apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner"
# Event-time rules of the job, in seconds (config/streaming.yaml has 1 h, 1 h, 30 min, 5 min).
LATENESS = 60  # time.lateness
SPLIT_EVERY = 60  # sessions.split_every: the job releases a user's events at bucket end + LATENESS
LABEL_WINDOW = 60  # labels.window: a label is due at impression + max(LABEL_WINDOW, LATENESS)
OUTPUT_WINDOW = 60  # time.output_window
# The generator's users all arrive within ~7 s, so N_EVENTS span ~40 s of event time (checked).
GENERATOR_KNOBS = {
    "duration_hours": 0.002,
    # Crawler bots only: a per-event rule. The behavioural rules judge whole activity runs,
    # which this short a stream cuts off (the generator warns), so they would not match the truth.
    "bot_rule_split": {"crawler_user_agent": 1.0},
}
# Wall-clock seconds the job gets to start, pull and process every message before its bucket is released
# (measured 15-25 messages/s on 2 cores, start-up included: 10 messages per pull, each pull one bundle;
# 1500 messages took 64-74 s).
PROCESSING_BUDGET = 110
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


# --- the plan: event times just ahead of the wall clock ------------------------------------------


def plan_times(now: float) -> tuple[float, float]:
    """(start of the events, release time), both epoch seconds.

    Every event falls in the `split_every` bucket [B, B + SPLIT_EVERY) (one bucket, so no user's
    activity or label is split across two), which the job releases at B + SPLIT_EVERY + LATENESS: the
    earliest such time that leaves PROCESSING_BUDGET to process every message. Then now - B <=
    SPLIT_EVERY + LATENESS - PROCESSING_BUDGET (10 s) < LATENESS, so no event is too late by its
    publish time, as in the truth (no arrival times: nothing too late).
    """
    bucket = math.ceil((now + PROCESSING_BUDGET - SPLIT_EVERY - LATENESS) / SPLIT_EVERY) * SPLIT_EVERY
    assert now - bucket < LATENESS - 30
    return bucket + 1.0, bucket + SPLIT_EVERY + LATENESS


def job_config(path: Path) -> Path:
    """config/streaming.yaml with the short event-time rules above."""
    cfg = yaml.safe_load((ROOT / "config" / "streaming.yaml").read_text())
    cfg["schema"]["directory"] = str(SCHEMA_DIR)
    cfg.pop("online_store", None)  # no Redis here (tests/test_online_store.py covers it)
    # The shipped early firing (every 30 s of processing time) stays on: files get one per pane.
    cfg["time"].update(lateness=f"{LATENESS}s", output_window={"type": "fixed", "size": f"{OUTPUT_WINDOW}s"})
    cfg["sessions"] = {"gap": f"{LATENESS}s", "split_every": f"{SPLIT_EVERY}s"}
    # A user's run closes at min(last + gap, first + max_run_duration) + lateness (transforms/bots.py):
    # the shortest allowed gap and cap keep that within a couple of minutes of wall clock.
    cfg["bots"] = {"session_gap": "60s", "max_run_duration": "120s"}
    cfg["labels"]["window"] = f"{LABEL_WINDOW}s"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_events(path: Path, start: float, monkeypatch) -> dict:
    """Generate the events and their truth. The generator's label truth uses the pipeline's default
    30 min attribution window (its module constant LABEL_WINDOW_MS); the job here uses LABEL_WINDOW,
    so the truth is computed with that window too."""
    from feedback_tools import generate as gen

    monkeypatch.setattr(gen, "LABEL_WINDOW_MS", LABEL_WINDOW * 1000)
    iso = dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    truth = gen.generate(N_EVENTS, str(path), seed=SEED, start=iso, lateness_s=LATENESS, **GENERATOR_KNOBS)
    lo, hi = (iso_seconds(t) for t in truth["event_time_range"])
    bucket = start - 1.0
    assert bucket <= lo and hi < bucket + SPLIT_EVERY, (
        f"the events span {truth['event_time_range']}, more than one {SPLIT_EVERY}s bucket from "
        f"{bucket}: lower N_EVENTS or duration_hours"
    )
    assert truth["counts"]["too_late"] == 0
    return truth


# --- Pub/Sub through the official client ----------------------------------------------------------


class PubSub:
    """Topics and subscriptions of one test, through google-cloud-pubsub and PUBSUB_EMULATOR_HOST."""

    def __init__(self):
        from google.cloud import pubsub_v1

        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()

    def topic(self, name: str) -> str:
        path = self.publisher.topic_path(PROJECT, name)
        self.publisher.create_topic(name=path)
        return path

    def subscription(self, topic: str, name: str) -> str:
        path = self.subscriber.subscription_path(PROJECT, name)
        self.subscriber.create_subscription(name=path, topic=topic, ack_deadline_seconds=60)
        return path

    def publish_lines(self, topic: str, lines: list[bytes]) -> list[str]:
        """Every line as one message, with its line number and (when it has one) event_id as attributes.
        Returns the message ids."""
        futures = []
        for n, line in enumerate(lines, 1):
            attrs = {"line": str(n)}
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("event_id"), str) and obj["event_id"]:
                attrs["event_id"] = obj["event_id"][:1024]
            futures.append(self.publisher.publish(topic, line, **attrs))
        return [f.result(timeout=60) for f in futures]

    def pull_all(self, subscription: str) -> list:
        """Every message waiting now (acknowledged), as PubsubMessage protos."""
        out = []
        while True:
            response = self.subscriber.pull(subscription=subscription, max_messages=1000, timeout=10)
            received = response.received_messages
            if not received:
                return out
            self.subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in received])
            out.extend(m.message for m in received)

    def close(self):
        self.publisher.stop()
        self.subscriber.close()


# --- the job's files ----------------------------------------------------------------------------------


def _log_tail(path: Path, limit: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


# --- the test, step by step -----------------------------------------------------------------------------


@pytest.fixture
def pubsub(pubsub_emulator, monkeypatch):
    """A PubSub client of the emulator (PUBSUB_EMULATOR_HOST set for this test)."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator)
    ps = PubSub()
    yield ps
    ps.close()


@dataclasses.dataclass(frozen=True)
class Published:
    """The topics and subscriptions of the test, and the events published before the job starts."""

    events_sub: str
    labels_topic: str
    dead_topic: str
    labels_sub: str
    dead_sub: str
    message_ids: list[str]
    published_from: dt.datetime
    published_until: dt.datetime


def publish_events(ps: PubSub, lines: list[bytes]) -> Published:
    """Creates the topics and subscriptions, then publishes every line to the events topic."""
    events_topic, labels_topic, dead_topic = ps.topic("events"), ps.topic("labels"), ps.topic("dead-letters")
    events_sub = ps.subscription(events_topic, "events-job")
    labels_sub = ps.subscription(labels_topic, "labels-check")
    dead_sub = ps.subscription(dead_topic, "dead-letters-check")
    published_from = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    message_ids = ps.publish_lines(events_topic, lines)
    published_until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    assert len(set(message_ids)) == N_EVENTS
    return Published(
        events_sub, labels_topic, dead_topic, labels_sub, dead_sub, message_ids, published_from, published_until
    )


def start_job(config: Path, published: Published, out: Path, log_path: Path, emulator: str) -> subprocess.Popen:
    """`python -m pipelines.streaming` reading the events subscription, publishing labels and dead letters."""
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": emulator, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pipelines.streaming",
        "--config",
        str(config),
        "--subscription",
        published.events_sub,
        "--output",
        str(out),
        "--labels-topic",
        published.labels_topic,
        "--dead-letter-topic",
        published.dead_topic,
        f"--runner={RUNNER}",
    ]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


@dataclasses.dataclass
class JobRun:
    """What the job published (pulled from the check subscriptions) and how it stopped."""

    labels_msgs: list = dataclasses.field(default_factory=list)
    dead_msgs: list = dataclasses.field(default_factory=list)
    last_dead_at: float | None = None
    code: int | None = None
    stop_s: float = float("nan")


def outputs_complete(run: JobRun, out: Path, truth: dict) -> bool:
    """Every label, dead letter, archived event and slate item the truth predicts is out."""
    file_labels = read_output(out, "labels")
    return (
        len(run.labels_msgs) == truth["labels"]["exposures"] == len(file_labels)
        and len(run.dead_msgs) == sum(truth["dead_letter_by_reason"].values())
        and len(read_output(out, "archive")) == truth["counts"]["valid"]
        and slate_items(read_output(out, "slates"))
        == sorted((l["request_id"], l["item_id"]) for l in file_labels if l["request_id"] is not None)
    )


def wait_for_outputs(
    job, ps: PubSub, published: Published, run: JobRun, out: Path, log_path: Path, truth, release, due
):
    """Waits past the release time until everything expected is out (and 5 s without a new file or
    message), at most until every output is due by the job's own bound."""
    state, changed_at = None, time.time()
    while True:
        assert job.poll() is None, f"the job exited early (code {job.returncode}); log:\n{_log_tail(log_path)}"
        run.labels_msgs += ps.pull_all(published.labels_sub)
        new_dead = ps.pull_all(published.dead_sub)
        if new_dead:
            run.dead_msgs += new_dead
            run.last_dead_at = time.time()
        now = time.time()
        new_state = (len(run.labels_msgs), len(run.dead_msgs), count_files(out, OUTPUT_NAMES))
        if new_state != state:
            state, changed_at = new_state, now
        complete = outputs_complete(run, out, truth)
        if (complete and now > release and now - changed_at > 5) or now > due + 30:
            return
        time.sleep(2)


def stop_job(job: subprocess.Popen) -> tuple[int | None, float]:
    """SIGTERM, then (exit code or None if it had to be killed, seconds it took)."""
    stop_at = time.monotonic()
    if job.poll() is None:
        job.send_signal(signal.SIGTERM)
    try:
        code = job.wait(JOB_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait(10)
        code = None
    return code, time.monotonic() - stop_at


def run_job(ps: PubSub, published: Published, config: Path, out: Path, log_path: Path, emulator: str, truth, release):
    """Runs the job until its outputs are complete (or overdue), stops it, and pulls what it published."""
    # The job's own bound on how far behind the watermark (here: the wall clock) its outputs can be.
    due = (
        iso_seconds(truth["event_time_range"][1])
        + GraphSettings.from_config(load_config(str(config))).max_output_delay_s
    )
    job = start_job(config, published, out, log_path, emulator)
    run = JobRun()
    try:
        wait_for_outputs(job, ps, published, run, out, log_path, truth, release, due)
    finally:
        run.code, run.stop_s = stop_job(job)
        run.labels_msgs += ps.pull_all(published.labels_sub)
        run.dead_msgs += ps.pull_all(published.dead_sub)
    return run


def timing_note(run: JobRun, published: Published, release: float) -> str:
    # The last dead letter roughly marks the end of processing (dead letters are published at once and
    # spread over the messages); past the release time, events reach closed windows and labels may differ.
    until = published.published_until.timestamp()
    processed_s = (run.last_dead_at - until) if run.last_dead_at else float("nan")
    return (
        f"{N_EVENTS} messages; the last dead letter came {processed_s:.0f}s after publishing (budget "
        f"{PROCESSING_BUDGET}s, release after {release - until:.0f}s)"
    )


def assert_dead_letters(run: JobRun, outputs: dict, truth: dict, message_ids: list[str]) -> None:
    """Every reason the truth predicts, with its count, on the topic and in the files; each one names a
    distinct published message (source "pubsub:<message id>")."""
    predicted = Counter({r: n for r, n in truth["dead_letter_by_reason"].items() if n})
    published_dead = [json.loads(m.data) for m in run.dead_msgs]
    assert Counter(d["reason"] for d in published_dead) == predicted
    assert Counter(d["reason"] for d in outputs["dead_letter"]) == predicted
    sources = [d["source"] for d in published_dead]
    assert len(set(sources)) == len(sources) and {s.removeprefix("pubsub:") for s in sources} <= set(message_ids)
    assert sorted(sources) == sorted(d["source"] for d in outputs["dead_letter"])


def assert_every_event_accounted(outputs: dict, truth: dict, published: Published, timing: str) -> None:
    """Every valid event archived once (a clean run of an at-most-once source delivers each message
    once), every other event in its outcome, by event id."""
    counts = truth["counts"]
    archive = outputs["archive"]
    assert len(archive) == counts["valid"], timing
    assert len({e["event_id"] for e in archive}) == len(archive)
    assert Counter(e["event_type"] for e in archive) == Counter(
        {t: n for t, n in truth["valid_event_count_by_type"].items() if n}
    )
    # Arrival time is the publish time (the emulator's clock is this machine's).
    assert all(published.published_from <= e["arrival_time"] <= published.published_until for e in archive)

    assert sorted(e["event_id"] for e in outputs["bots"]) == sorted(truth["bot_event_ids"])
    assert Counter(e["bot_rule"] for e in outputs["bots"]) == Counter(
        {r: n for r, n in truth["bots_by_rule"].items() if n}
    )
    assert Counter(d["event_id"] for d in outputs["duplicates"]) == Counter(truth["duplicate_event_ids"])
    assert sorted(c["event_id"] for c in outputs["consent_dropped"]) == sorted(truth["consent_dropped_event_ids"])
    assert counts["too_late"] == 0
    accounted = (
        len(archive)
        + len(outputs["bots"])
        + len(outputs["duplicates"])
        + len(outputs["dead_letter"])
        + len(outputs["consent_dropped"])
    )
    assert accounted == N_EVENTS


def assert_labels(run: JobRun, outputs: dict, truth: dict, timing: str) -> None:
    """One label per exposure, published exactly once and written to the files, positives as the truth."""
    published_labels = [json.loads(m.data) for m in run.labels_msgs]
    file_labels = outputs["labels"]
    label_truth = truth["labels"]
    assert len(published_labels) == label_truth["exposures"] == len(file_labels), timing
    assert len({l["label_id"] for l in published_labels}) == len(published_labels)
    assert sorted(l["label_id"] for l in published_labels) == sorted(l["label_id"] for l in file_labels)
    assert sorted(l["label_id"] for l in published_labels if l["label"]) == label_truth["positive_label_ids"], timing
    assert sum(l["label"] == 0 for l in published_labels) == label_truth["negatives"]
    for kind in ("click", "add_to_cart", "purchase"):
        assert sum(kind in l["outcome_types"] for l in published_labels) == label_truth["by_outcome"][kind], kind
    assert len(outputs["orphan_outcomes"]) == label_truth["orphan_outcomes"]
    assert len(outputs["late_outcomes"]) == label_truth["late_outcomes"] == 0, timing


def assert_slates(outputs: dict, timing: str) -> None:
    """Every label with a request_id, in exactly one slate per request. (This caught BuildSlates'
    request windows dropping every label emitted behind the watermark, then splitting requests into
    several partial slates, one per late pane.) The wait includes the slates, which close a session
    gap (60 s) after their request's labels."""
    slates = outputs["slates"]
    expected_items = sorted((l["request_id"], l["item_id"]) for l in outputs["labels"] if l["request_id"] is not None)
    assert expected_items and slate_items(slates) == expected_items, timing
    assert len({s["request_id"] for s in slates}) == len(slates), "a request is split over several slates"
    assert all(
        s["n_items"] == len(s["items"]) and s["n_positive"] == sum(i["label"] for i in s["items"]) for s in slates
    )


@pytest.mark.timeout(900)  # includes a first `go build` of the emulator (~1.5-4 min)
def test_streaming_job_against_pubsub_emulator(pubsub_emulator, pubsub, tmp_path, monkeypatch):
    t_begin = time.monotonic()
    start, release = plan_times(time.time())
    truth = make_events(tmp_path / "events.jsonl", start, monkeypatch)
    published = publish_events(pubsub, event_lines(tmp_path / "events.jsonl", N_EVENTS))
    out, log_path = tmp_path / "out", tmp_path / "job.log"
    config = job_config(tmp_path / "job.yaml")
    run = run_job(pubsub, published, config, out, log_path, pubsub_emulator, truth, release)
    timing = timing_note(run, published, release)
    print(
        f"\npubsub e2e: {timing}; job exited {run.stop_s:.1f}s after SIGTERM; "
        f"{count_files(out, OUTPUT_NAMES)} output files; "
        f"test {time.monotonic() - t_begin:.0f}s",
        file=sys.stderr,
    )
    # The job stops cleanly on SIGTERM.
    assert run.code == 0, (
        f"the job did not exit 0 within {JOB_STOP_TIMEOUT_S}s of SIGTERM (code {run.code}); log:\n{_log_tail(log_path)}"
    )

    outputs = {name: read_output(out, name) for name in OUTPUT_NAMES}
    assert_dead_letters(run, outputs, truth, published.message_ids)
    assert_every_event_accounted(outputs, truth, published, timing)
    assert_labels(run, outputs, truth, timing)
    assert_slates(outputs, timing)
