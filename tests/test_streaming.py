"""The streaming graph under TestStream, against the batch job on the same events (parity).

Runner: BundleBasedDirectRunner (the only local runner with TestStream that runs our stateful
steps); the watermark follows arrival time minus a few seconds, as a Pub/Sub watermark would, and is
advanced past every deadline before the end (see shared/BEAM-NOTES.md on timer output).
"""
import glob
import json
import os

import apache_beam as beam
import fastavro
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window

from pipelines import batch, streaming
from pipelines.graph import GraphSettings
from tests.conftest import write_config
from tests.redis_server import redis_server  # noqa: F401 - pytest fixture (a real redis-server)
from transforms import contract
from transforms.config import load_config
from transforms.io import sum_counters

T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z
S, M, H = 1000, 60_000, 3_600_000
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"


def ev(eid, etype, t, user, item=None, request=None, **kw):
    e = {"event_id": eid, "event_type": etype, "event_time": t, "user_id": user, "user_agent": CHROME}
    if item:
        e["item_id"] = item
    if request:
        e["request_id"] = request
    e.update(kw)
    return e


# (event, arrival time) in arrival order
SCENARIO = sorted([
    (ev("imp1", "impression", T0, "u1", "i1", "r1", position=1, propensity=0.5, policy="p"), T0 + 1 * S),
    (ev("imp2", "impression", T0, "u1", "i2", "r1", position=2, propensity=0.3, policy="p"), T0 + 1 * S),
    (ev("c1", "click", T0 + 10 * S, "u1", "i1", "r1"), T0 + 11 * S),
    (ev("c1", "click", T0 + 10 * S, "u1", "i1", "r1"), T0 + 30 * S),                    # retried duplicate
    (ev("p1", "purchase", T0 + 20 * M, "u1", "i2", value=12.5), T0 + 20 * M + 1 * S),  # no request_id
    (ev("c2", "click", T0 + 5 * M + 3 * S, "u2", "i3", "r2"), T0 + 5 * M + 4 * S),     # before its impression
    (ev("imp3", "impression", T0 + 5 * M, "u2", "i3", "r2", position=1), T0 + 5 * M + 10 * S),
    (ev("c3", "click", T0 + 1 * M, "u3", "i9", "r9"), T0 + 1 * M + 1 * S),              # orphan
    (ev("imp4", "impression", T0, "u4", "i4", "r4", position=3), T0 + 2 * S),
    (ev("a4", "add_to_cart", T0 + 25 * M, "u4", "i4", "r4"), T0 + 75 * M),               # late outcome
    (ev("v5", "view", T0 + 2 * M, "u5", "i5"), T0 + 2 * M + 2 * H),                      # too late
    (ev("imp6", "impression", T0 + 3 * M, "u6", "i6", "r6", position=1), T0 + 3 * M + 1 * S),
    (ev("s6", "skip", T0 + 3 * M + 5 * S, "u6", "i6", "r6"), T0 + 3 * M + 6 * S),
    (ev("imp7", "impression", T0 + 90 * M, "u7", "i7", "r7", position=1), T0 + 90 * M + 1 * S),
    (ev("c7", "click", T0 + 91 * M, "u7", "i7", "r7", dwell_ms=4000), T0 + 91 * M + 1 * S),
    # impression and click on either side of a per-user bucket boundary (sessions.split_every = 1 h)
    (ev("imp8", "impression", T0 + 59 * M + 50 * S, "u8", "i8", "r8", position=1), T0 + 59 * M + 51 * S),
    (ev("c8", "click", T0 + 60 * M + 10 * S, "u8", "i8", "r8"), T0 + 60 * M + 11 * S),
], key=lambda pair: pair[1])


def run_streaming(settings, cfg, events_with_arrival, out_dir, slack_ms=5 * S):
    stream = TestStream()
    watermark = None
    for n, (e, arrival) in enumerate(events_with_arrival):
        wm = (arrival - slack_ms) / 1000.0
        if watermark is None or wm > watermark:
            stream = stream.advance_watermark_to(wm)
            watermark = wm
        stream = stream.add_elements([window.TimestampedValue((f"test:{n}", orjson.dumps(e), arrival), arrival / 1000.0)])
    # Step the watermark past every deadline: on this runner, output from a timer that fires only at
    # the final jump to infinity can be lost (shared/BEAM-NOTES.md).
    last = max(a for _, a in events_with_arrival)
    for step in range(1, 9):
        stream = stream.advance_watermark_to((last + step * settings.max_output_delay_s * 1000 / 2) / 1000.0)
    stream = stream.advance_watermark_to_infinity()
    options = PipelineOptions(streaming=True)
    options.view_as(StandardOptions).runner = "BundleBasedDirectRunner"
    with beam.Pipeline(options=options) as p:
        raw = p | "Events" >> stream
        streaming.build(p, cfg, settings, raw, str(out_dir))


def run_batch(tmp_path, events_with_arrival, cfg_path):
    path = tmp_path / "events.jsonl"
    with open(path, "wb") as f:
        for e, arrival in events_with_arrival:
            f.write(orjson.dumps({**e, "arrival_time": arrival}) + b"\n")
    out = tmp_path / "batch"
    report = batch.run(["--config", cfg_path, "--input", str(path), "--output", str(out)])
    return report, out


def avro_rows(pattern):
    return [r for f in sorted(glob.glob(pattern, recursive=True)) if os.path.getsize(f)
            for r in fastavro.reader(open(f, "rb"))]


def jsonl_rows(pattern):
    return [json.loads(l) for f in sorted(glob.glob(pattern, recursive=True)) for l in open(f) if l.strip()]


def canonical_labels(rows):
    out = []
    for r in rows:
        r = dict(r)
        for k in ("impression_time", "label_time"):
            if hasattr(r[k], "timestamp"):
                r[k] = int(r[k].timestamp() * 1000)
        out.append(r)
    return sorted(out, key=lambda r: r["label_id"])


@pytest.fixture(scope="module")
def both(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("parity")
    host, port = redis_server
    cfg_path = write_config(tmp, "time: {arrival_field: arrival_time}\n"
                                 "features: {windows: [{size: 1h, period: 30m}], entities: [user, item]}\n"
                                 f"online_store: {{host: {host}, port: {port}, key_prefix: parity}}\n")
    cfg = load_config(cfg_path)
    settings = GraphSettings.from_config(cfg)
    report, batch_out = run_batch(tmp, SCENARIO, cfg_path)
    stream_out = tmp / "stream"
    run_streaming(settings, cfg, SCENARIO, stream_out)
    return report, batch_out, stream_out


def test_batch_labels_follow_the_rules(both):
    report, out, _ = both
    labels = {l["label_id"]: l for l in canonical_labels(avro_rows(str(out / "labels" / "*.avro")))}
    assert set(labels) == {"imp1", "imp2", "imp3", "imp4", "imp6", "imp7", "imp8"}
    assert labels["imp8"]["label"] == 1                                             # click in the next bucket
    assert (labels["imp1"]["label"], labels["imp1"]["weight"], labels["imp1"]["outcome_types"]) == (1, 1.0, ["click"])
    assert labels["imp1"]["first_outcome_delay_ms"] == 10 * S
    assert (labels["imp2"]["label"], labels["imp2"]["weight"]) == (1, 5.0)          # purchase without request_id
    assert labels["imp3"]["label"] == 1                                             # outcome arrived first
    assert (labels["imp4"]["label"], labels["imp4"]["outcome_types"]) == (0, [])    # its add_to_cart came late
    assert (labels["imp6"]["label"], labels["imp6"]["outcome_types"]) == (0, ["skip"])
    assert labels["imp7"]["dwell_ms"] == 4000 and labels["imp1"]["position"] == 1 and labels["imp1"]["propensity"] == 0.5
    assert [o["event_id"] for o in jsonl_rows(str(out / "orphan_outcomes" / "*.jsonl"))] == ["c3"]
    late = jsonl_rows(str(out / "late_outcomes" / "*.jsonl"))
    assert [(o["event_id"], o["label_id"]) for o in late] == [("a4", "imp4")]
    assert report["counts"]["too_late"] == 1 and report["counts"]["duplicates"] == 1
    assert report["labels"]["one_label_per_exposure"] and report["labels"]["exposures"] == 7
    too_late = [d for d in jsonl_rows(str(out / "dead_letter" / "*.jsonl")) if d["reason"] == "too_late"]
    assert too_late[0]["event_id"] == "v5" and too_late[0]["late_ms"] == 2 * H
    slates = {s["request_id"]: s for s in avro_rows(str(out / "slates" / "*.avro"))}
    assert [(i["item_id"], i["position"], i["label"]) for i in slates["r1"]["items"]] == [("i1", 1, 1), ("i2", 2, 1)]


def test_streaming_equals_batch(both):
    _, batch_out, stream_out = both
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


def test_streaming_counts_balance(both):
    _, _, stream_out = both
    counters = sum_counters(jsonl_rows(str(stream_out / "_counts" / "**" / "*.jsonl")))
    assert counters["input"] == len(SCENARIO) == sum(counters.get(o, 0) for o in contract.OUTCOMES)
    assert counters["labels"] == counters["exposures"] == 7


def feature_rows(root):
    import pyarrow.parquet as pq
    rows = {}
    for f in glob.glob(str(root / "features" / "**" / "*.parquet"), recursive=True):
        for r in pq.read_table(f).to_pylist():
            key = (r["entity_type"], r["entity_id"], r["window"], r["window_start"])
            # Streaming writes one row per pane (accumulating): the fullest is the final one.
            if key not in rows or r["n_events"] > rows[key]["n_events"]:
                rows[key] = r
    return rows


def test_streaming_features_equal_batch(both):
    _, batch_out, stream_out = both
    b, s = feature_rows(batch_out), feature_rows(stream_out)
    assert b and s == b


def test_streaming_quality_record_per_window(both):
    _, _, stream_out = both
    records = jsonl_rows(str(stream_out / "quality" / "**" / "*.jsonl"))
    assert records and all({"window_start", "window_end", "counts", "slos", "breaches"} <= set(r) for r in records)
    assert sum(r["counts"]["too_late"] for r in records) == 1
    assert any(s["slo"] == "ingestion_success" for r in records for s in r["slos"])


def test_online_store_holds_the_newest_window_per_entity(both, redis_server):
    import redis
    from transforms.online_store import read_features
    _, batch_out, _ = both
    newest = {}
    for (etype, eid, win, start), row in feature_rows(batch_out).items():
        if (etype, eid, win) not in newest or start > newest[(etype, eid, win)]["window_start"]:
            newest[(etype, eid, win)] = row
    client = redis.Redis(*redis_server)
    for (etype, eid, win), row in newest.items():
        stored = read_features(client, etype, win, eid, prefix="parity")
        assert stored is not None, (etype, eid)
        assert stored["window_end"] == row["window_end"] and stored["n_events"] == row["n_events"]


def test_shipped_streaming_config_triggers_translate(tmp_path):
    """config/streaming.yaml's early firings must survive translation to the runner API (a float delay
    did not: 'float' object cannot be interpreted as an integer)."""
    from apache_beam.transforms import trigger as tr
    cfg = load_config("config/streaming.yaml")
    settings = GraphSettings.from_config(cfg)
    windowing = streaming.output_windowing(cfg, settings, "W").transform
    assert cfg.time.early_firing
    proto = windowing.windowing.triggerfn.to_runner_api(None)
    assert tr.TriggerFn.from_runner_api(proto, None) is not None
