"""Shared test helpers: the batch/streaming parity scenario, stream builders, output readers and
parity assertions (like TFDV's utils/test_util.py). Tests import these; they never call another
module's test functions.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import subprocess
import sys

import apache_beam as beam
import fastavro
import orjson
from apache_beam.coders import BytesCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window

from pipelines import batch, streaming
from tests.conftest import ROOT
from transforms import contract
from transforms.io import sum_counters

T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z
S, M, H = 1000, 60_000, 3_600_000
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
)
BUNDLE_DIRECT = ("--runner=BundleBasedDirectRunner",)


def ev(eid, etype, t, user, item=None, request=None, **kw):
    e = {"event_id": eid, "event_type": etype, "event_time": t, "user_id": user, "user_agent": CHROME}
    if item:
        e["item_id"] = item
    if request:
        e["request_id"] = request
    e.update(kw)
    return e


# One case of every rule, as (event, arrival time) in arrival order.
SCENARIO = sorted(
    [
        (ev("imp1", "impression", T0, "u1", "i1", "r1", position=1, propensity=0.5, policy="p"), T0 + 1 * S),
        (ev("imp2", "impression", T0, "u1", "i2", "r1", position=2, propensity=0.3, policy="p"), T0 + 1 * S),
        (ev("c1", "click", T0 + 10 * S, "u1", "i1", "r1"), T0 + 11 * S),
        (ev("c1", "click", T0 + 10 * S, "u1", "i1", "r1"), T0 + 30 * S),  # retried duplicate
        (ev("p1", "purchase", T0 + 20 * M, "u1", "i2", value=12.5), T0 + 20 * M + 1 * S),  # no request_id
        (ev("c2", "click", T0 + 5 * M + 3 * S, "u2", "i3", "r2"), T0 + 5 * M + 4 * S),  # before its impression
        (ev("imp3", "impression", T0 + 5 * M, "u2", "i3", "r2", position=1), T0 + 5 * M + 10 * S),
        (ev("c3", "click", T0 + 1 * M, "u3", "i9", "r9"), T0 + 1 * M + 1 * S),  # orphan
        (ev("imp4", "impression", T0, "u4", "i4", "r4", position=3), T0 + 2 * S),
        (ev("a4", "add_to_cart", T0 + 25 * M, "u4", "i4", "r4"), T0 + 75 * M),  # late outcome
        (ev("v5", "view", T0 + 2 * M, "u5", "i5"), T0 + 2 * M + 2 * H),  # too late
        (ev("imp6", "impression", T0 + 3 * M, "u6", "i6", "r6", position=1), T0 + 3 * M + 1 * S),
        (ev("s6", "skip", T0 + 3 * M + 5 * S, "u6", "i6", "r6"), T0 + 3 * M + 6 * S),
        (ev("imp7", "impression", T0 + 90 * M, "u7", "i7", "r7", position=1), T0 + 90 * M + 1 * S),
        (ev("c7", "click", T0 + 91 * M, "u7", "i7", "r7", dwell_ms=4000), T0 + 91 * M + 1 * S),
        # impression and click on either side of a per-user bucket boundary (sessions.split_every = 1 h)
        (ev("imp8", "impression", T0 + 59 * M + 50 * S, "u8", "i8", "r8", position=1), T0 + 59 * M + 51 * S),
        (ev("c8", "click", T0 + 60 * M + 10 * S, "u8", "i8", "r8"), T0 + 60 * M + 11 * S),
    ],
    key=lambda pair: pair[1],
)
SCENARIO_EXPOSURES = 7


# --- running the jobs -----------------------------------------------------------------------------


def scenario_stream(settings, events_with_arrival, slack_ms=5 * S, step_watermark=True) -> TestStream:
    """(event, arrival) pairs as a TestStream with the watermark at arrival - slack; elements are
    JSON bytes (decode with `raw_record`).

    Bytes, a standard coder: the runner itself holds TestStream's elements, and Flink's Java side cannot
    decode Python's pickled tuples ("UnknownCoderWrapper was used ... decoding").
    `step_watermark`: step the watermark past every deadline before infinity: on
    BundleBasedDirectRunner, output from a timer that fires only at the final jump to infinity can be
    lost (shared/BEAM-NOTES.md)."""
    stream, watermark = TestStream(coder=BytesCoder()), None
    for n, (e, arrival) in enumerate(events_with_arrival):
        wm = (arrival - slack_ms) / 1000.0
        if watermark is None or wm > watermark:
            stream, watermark = stream.advance_watermark_to(wm), wm
        element = orjson.dumps([f"test:{n}", orjson.dumps(e).decode(), arrival])
        stream = stream.add_elements([window.TimestampedValue(element, arrival / 1000.0)])
    if step_watermark:
        last = max(a for _, a in events_with_arrival)
        for step in range(1, 9):
            stream = stream.advance_watermark_to((last + step * settings.max_output_delay_s * 1000 / 2) / 1000.0)
    return stream.advance_watermark_to_infinity().with_output_types(bytes)


def raw_record(element: bytes) -> tuple:
    """A scenario_stream element -> RawRecord (source, payload bytes, arrival ms)."""
    source, payload, arrival = orjson.loads(element)
    return source, payload.encode(), arrival


def run_streaming_on(beam_args, settings, cfg, events_with_arrival, out_dir, step_watermark=True, slack_ms=5 * S):
    """The streaming graph (pipelines.streaming.build) over scenario_stream on the runner `beam_args` name."""
    options = PipelineOptions(list(beam_args), streaming=True)
    with beam.Pipeline(options=options) as p:
        raw = (
            p
            | "Events" >> scenario_stream(settings, events_with_arrival, slack_ms, step_watermark)
            | "RawRecords" >> beam.Map(raw_record)
        )
        streaming.build(p, cfg, settings, raw, str(out_dir))


def run_streaming(settings, cfg, events_with_arrival, out_dir, slack_ms=5 * S):
    run_streaming_on(BUNDLE_DIRECT, settings, cfg, events_with_arrival, out_dir, slack_ms=slack_ms)


def run_batch(tmp_path, events_with_arrival, cfg_path):
    """The batch job over the pairs written as JSON lines with `arrival_time`; returns (report, output)."""
    path = tmp_path / "events.jsonl"
    with open(path, "wb") as f:
        for e, arrival in events_with_arrival:
            f.write(orjson.dumps({**e, "arrival_time": arrival}) + b"\n")
    out = tmp_path / "batch"
    report = batch.run(["--config", cfg_path, "--input", str(path), "--output", str(out)])
    return report, out


def run_batch_process(config: str, input_glob: str, out, *flags: str) -> subprocess.CompletedProcess:
    """`python -m pipelines.batch` as a user runs it, in a child process (10 min at most); output captured."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.batch",
            "--config",
            config,
            "--input",
            input_glob,
            "--output",
            str(out),
            *flags,
        ],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- reading outputs --------------------------------------------------------------------------------


def avro_rows(pattern):
    return [
        r
        for f in sorted(glob.glob(pattern, recursive=True))
        if os.path.getsize(f)
        for r in fastavro.reader(open(f, "rb"))
    ]


def jsonl_rows(pattern):
    return [json.loads(line) for f in sorted(glob.glob(pattern, recursive=True)) for line in open(f) if line.strip()]


def canonical_labels(rows):
    """Label records sorted by label_id, with times as epoch ms (Avro gives datetimes)."""
    out = []
    for r in rows:
        r = dict(r)
        for k in ("impression_time", "label_time"):
            if hasattr(r[k], "timestamp"):
                r[k] = int(r[k].timestamp() * 1000)
        out.append(r)
    return sorted(out, key=lambda r: r["label_id"])


# --- parity assertions -------------------------------------------------------------------------------


def assert_streaming_equals_batch(batch_out, stream_out):
    """Same labels, orphan and late outcomes, dead letters and valid events in a streaming output folder
    (windowed files under sub-folders) as in a batch one."""
    b = canonical_labels(avro_rows(str(batch_out / "labels" / "*.avro")))
    s = canonical_labels(avro_rows(str(stream_out / "labels" / "**" / "*.avro")))
    assert s == b
    for name in ("orphan_outcomes", "late_outcomes"):
        bs = sorted(o["event_id"] for o in jsonl_rows(str(batch_out / name / "*.jsonl")))
        ss = sorted(o["event_id"] for o in jsonl_rows(str(stream_out / name / "**" / "*.jsonl")))
        assert ss == bs, name
    dead_b = sorted((d["reason"], d["source"]) for d in jsonl_rows(str(batch_out / "dead_letter" / "*.jsonl")))
    dead_s = sorted(d["reason"] for d in jsonl_rows(str(stream_out / "dead_letter" / "**" / "*.jsonl")))
    assert dead_s == [r for r, _ in dead_b]
    archived = sorted(e["event_id"] for e in avro_rows(str(stream_out / "archive" / "**" / "*.avro")))
    valid = sorted(e["event_id"] for e in avro_rows(str(batch_out / "events" / "*.avro")))
    assert archived == valid
    assert all(e["arrival_time"] is not None for e in avro_rows(str(stream_out / "archive" / "**" / "*.avro")))


def assert_counts_balance(stream_out, inputs: int, exposures: int):
    """The streaming `_counts` panes sum to the accounting identity and one label per exposure."""
    counters = sum_counters(jsonl_rows(str(stream_out / "_counts" / "**" / "*.jsonl")))
    assert counters[contract.COUNTER_INPUT] == inputs == sum(counters.get(o, 0) for o in contract.OUTCOMES)
    assert counters[contract.COUNTER_LABELS] == counters[contract.COUNTER_EXPOSURES] == exposures


def feature_event(eid, t, etype, user="u1", item=None, category=None, dwell=None) -> dict:
    """A clean event with just the fields feature computation reads."""
    return {
        "event_id": eid,
        "event_type": etype,
        "event_time": t,
        "user_id": user,
        "item_id": item,
        "dwell_ms": dwell,
        "value": None,
        "item_meta": {"category": category} if category else None,
    }


# --- end-to-end streaming tests (Pub/Sub, Kafka): the job's files ---------------------------------


def event_lines(path, expected: int) -> list[bytes]:
    """The lines of a generated events file (exactly `expected`, newline-terminated)."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == expected
    return lines[:-1]


def iso_seconds(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_output(out, name: str) -> list[dict]:
    """Every record of one output (files are written whole, then renamed, so none is half-written)."""
    records = []
    for path in sorted(glob.glob(str(out / name / "*"))):
        if path.endswith(".avro"):
            with open(path, "rb") as f:
                records.extend(fastavro.reader(f))
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:
                records.extend(orjson.loads(line) for line in f if line.strip())
    return records


def slate_items(slates: list[dict]) -> list[tuple]:
    return sorted((s["request_id"], i["item_id"]) for s in slates for i in s["items"])


def count_files(out, names) -> int:
    return sum(len(glob.glob(str(out / name / "*"))) for name in names)
