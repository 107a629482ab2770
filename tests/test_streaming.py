"""The streaming graph under TestStream, against the batch job on the same events (parity).

Runner: BundleBasedDirectRunner (the only local runner with TestStream that runs our stateful
steps); the watermark follows arrival time minus a few seconds, as a Pub/Sub watermark would, and is
advanced past every deadline before the end (see shared/BEAM-NOTES.md on timer output).
"""

import glob

import pytest

from pipelines import streaming
from pipelines.graph import GraphSettings
from tests.conftest import write_config
from tests.helpers import (  # noqa: F401
    CHROME,
    SCENARIO,
    SCENARIO_EXPOSURES,
    T0,
    H,
    M,
    S,
    assert_counts_balance,
    assert_streaming_equals_batch,
    avro_rows,
    canonical_labels,
    ev,
    jsonl_rows,
    run_batch,
    run_streaming,
)
from tests.redis_server import redis_server  # noqa: F401 - pytest fixture (a real redis-server)
from transforms.config import load_config


@pytest.fixture(scope="module")
def both(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("parity")
    host, port = redis_server
    cfg_path = write_config(
        tmp,
        "time: {arrival_field: arrival_time}\n"
        "features: {windows: [{size: 1h, period: 30m}], entities: [user, item]}\n"
        f"online_store: {{host: {host}, port: {port}, key_prefix: parity}}\n",
    )
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
    assert labels["imp8"]["label"] == 1  # click in the next bucket
    assert (labels["imp1"]["label"], labels["imp1"]["weight"], labels["imp1"]["outcome_types"]) == (1, 1.0, ["click"])
    assert labels["imp1"]["first_outcome_delay_ms"] == 10 * S
    assert (labels["imp2"]["label"], labels["imp2"]["weight"]) == (1, 5.0)  # purchase without request_id
    assert labels["imp3"]["label"] == 1  # outcome arrived first
    assert (labels["imp4"]["label"], labels["imp4"]["outcome_types"]) == (0, [])  # its add_to_cart came late
    assert (labels["imp6"]["label"], labels["imp6"]["outcome_types"]) == (0, ["skip"])
    assert labels["imp7"]["dwell_ms"] == 4000
    assert labels["imp1"]["position"] == 1 and labels["imp1"]["propensity"] == 0.5
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
    assert_streaming_equals_batch(batch_out, stream_out)


def test_streaming_counts_balance(both):
    _, _, stream_out = both
    assert_counts_balance(stream_out, len(SCENARIO), SCENARIO_EXPOSURES)


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
