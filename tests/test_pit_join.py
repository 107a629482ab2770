"""Point-in-time join: as-of lookup (no leakage), nulls for unknown entities, the job end to end."""

import glob
import os
import random

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import pit_join
from pipelines.pit_join import asof_features, entity_ids, feature_columns, label_key, training_rows
from tests.conftest import FN_API_RUNNER
from tests.helpers import feature_event
from transforms.features import FeaturesConfig, arrow_schema, compute_all, features_for_entity, partition_of

T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z
MIN = 60_000
W = "1h/5m"


def frow(entity_type, entity_id, end, n_events=1, window=W, **feats):
    row = {
        "entity_type": entity_type,
        "entity_id": entity_id,
        "window": window,
        "window_start": end - 3_600_000,
        "window_end": end,
        "n_events": n_events,
        "ctr": 0.1,
    }
    row.update(feats)
    return row


def lookup(rows, impression_time, entity_type="user", windows=(W,)):
    [(key, cols)] = list(asof_features(entity_type, rows, [("k", impression_time)], windows))
    assert key == "k"
    return cols


ROWS = [
    frow("user", "u1", T0, ctr=0.1),
    frow("user", "u1", T0 + 5 * MIN, ctr=0.2),
    frow("user", "u1", T0 + 10 * MIN, ctr=0.3),
]


def test_window_ending_exactly_at_impression_may_be_attached():
    cols = lookup(ROWS, T0 + 5 * MIN)
    assert cols["user_1h_5m_window_end"] == T0 + 5 * MIN and cols["user_1h_5m_ctr"] == 0.2


def test_window_ending_after_impression_is_never_attached():
    # The window ending 1 ms after the impression holds events up to that instant: leakage.
    cols = lookup(ROWS, T0 + 5 * MIN - 1)
    assert cols["user_1h_5m_window_end"] == T0 and cols["user_1h_5m_ctr"] == 0.1
    later = lookup(ROWS, T0 + 60 * MIN)  # the latest window before, however old
    assert later["user_1h_5m_window_end"] == T0 + 10 * MIN


def test_no_prior_window_or_no_features_gives_nulls():
    before_all = lookup(ROWS, T0 - 1)
    assert set(before_all) == {f"user_1h_5m_{f}" for f in ("window_end",) + features_for_entity("user")}
    assert all(v is None for v in before_all.values())
    unknown = lookup([], T0 + 5 * MIN, windows=(W, "24h/1h"))
    assert len(unknown) == 2 * (1 + len(features_for_entity("user"))) and all(v is None for v in unknown.values())


def test_latest_pane_of_a_window_wins():
    panes = [
        frow("user", "u1", T0, n_events=3, ctr=0.3),
        frow("user", "u1", T0, n_events=1, ctr=0.1),
        frow("user", "u1", T0, n_events=2, ctr=0.2),
    ]
    for order in (panes, panes[::-1]):
        assert lookup(order, T0)["user_1h_5m_ctr"] == 0.3


def test_windows_are_looked_up_separately():
    rows = ROWS + [frow("user", "u1", T0 - 60 * MIN, window="24h/1h", ctr=0.9)]
    cols = lookup(rows, T0 + 7 * MIN, windows=(W, "24h/1h"))
    assert cols["user_1h_5m_ctr"] == 0.2 and cols["user_24h_1h_ctr"] == 0.9
    assert cols["user_24h_1h_window_end"] == T0 - 60 * MIN


def test_no_leakage_randomised():
    rnd = random.Random(7)
    ends = sorted(rnd.sample(range(T0, T0 + 1000 * MIN, MIN), 200))
    rows = [frow("item", "i1", e, n_events=rnd.randint(1, 5), ctr=rnd.random()) for e in ends for _ in range(2)]
    requests = [(f"k{i}", rnd.randrange(T0 - 5 * MIN, T0 + 1005 * MIN)) for i in range(500)]
    got = dict(asof_features("item", rows, requests, (W,)))
    for key, t in requests:
        end = got[key]["item_1h_5m_window_end"]
        eligible = [e for e in ends if e <= t]
        assert end == (max(eligible) if eligible else None)
        assert "item_1h_5m_distinct_users" in got[key]
        assert "item_1h_5m_distinct_items" not in got[key]


def test_entity_ids_and_training_rows():
    label = {
        "request_id": "r",
        "user_id": "u1",
        "item_id": "i1",
        "item_category": None,
        "impression_time": T0,
        "label": 1,
        "weight": 1.0,
    }
    assert entity_ids(label, ("user", "item", "user_category")) == [
        ("user", "u1"),
        ("item", "i1"),
        ("user_category", "u1|unknown"),
    ]
    cols = [c for c, _ in feature_columns(("user", "item"), (W,))]
    assert "user_1h_5m_distinct_items" in cols and "item_1h_5m_distinct_users" in cols
    assert "item_1h_5m_distinct_items" not in cols
    [row] = training_rows([label], [{"user_1h_5m_ctr": 0.5}], cols)
    assert row["user_1h_5m_ctr"] == 0.5 and row["item_1h_5m_ctr"] is None and row["label"] == 1
    assert label_key(label) == label_key(dict(reversed(list(label.items()))))


LABEL_FIELDS = (
    ("request_id", "string"),
    ("user_id", "string"),
    ("item_id", "string"),
    ("item_category", ["null", "string"]),
    ("impression_time", "long"),
    ("label", "int"),
    ("weight", "double"),
)
# Labels with the fields the join reads (a subset of the schema in transforms/labels.py).
LABEL_SCHEMA = {
    "type": "record",
    "name": "Label",
    "namespace": "feedback.labels",
    "fields": [{"name": n, "type": t} for n, t in LABEL_FIELDS]
    + [{"name": "position", "type": ["null", "int"], "default": None}],
}


def write_features(folder, events, cfg) -> None:
    """The features of `events`, laid out as WriteOfflineFeatures writes them: one Parquet file a partition."""
    rows = compute_all(events, cfg)
    for part in {partition_of(r) for r in rows}:
        os.makedirs(folder / part)
        pq.write_table(
            pa.Table.from_pylist([r for r in rows if partition_of(r) == part], schema=arrow_schema()),
            str(folder / part / "features-00000-of-00001.parquet"),
        )


def label_row(request_id, user_id, category, impression_time, value, weight, position) -> dict:
    return {
        "request_id": request_id,
        "user_id": user_id,
        "item_id": "i1",
        "item_category": category,
        "impression_time": impression_time,
        "label": value,
        "weight": weight,
        "position": position,
    }


def run_pit_join(labels_glob: str, features, out) -> dict:
    """The job on FnApiRunner; returns the training rows by request_id."""
    rc = pit_join.main(
        [
            "--labels",
            labels_glob,
            "--features",
            str(features),
            "--output",
            str(out),
            "--num_shards",
            "1",
            f"--runner={FN_API_RUNNER}",
        ]
    )
    assert rc == 0
    result = {}
    for path in glob.glob(str(out / "training*.avro")):
        with open(path, "rb") as f:
            for rec in fastavro.reader(f):
                result[rec["request_id"]] = rec
    return result


def test_pit_join_job_end_to_end(tmp_path):
    """Features (as WriteOfflineFeatures lays them out) + labels -> training Avro on FnApiRunner."""
    events = [
        feature_event("a", T0 + 1 * MIN, "impression", "u1", "i1", "shoes"),
        feature_event("b", T0 + 2 * MIN, "click", "u1", "i1", "shoes"),
        feature_event("c", T0 + 12 * MIN, "impression", "u1", "i2", "books"),  # at/after the 1st impression below
        feature_event("d", T0 + 3 * MIN, "dwell", "u2", "i1", "shoes", dwell=4000),
    ]
    write_features(tmp_path / "features", events, FeaturesConfig())
    labels = [
        # 10:10 exactly: the 1h/5m window [09:10, 10:10) is attached; "c" at 10:12 is not in it.
        label_row("r1", "u1", "shoes", T0 + 10 * MIN, 1, 1.0, 0),
        # 1 ms before 10:05: the window ending 10:05 (holding "a" and "b") must not be used.
        label_row("r2", "u1", "shoes", T0 + 5 * MIN - 1, 0, 1.0, None),
        # A user never seen: nulls for user and user_category, the item's features still attach.
        label_row("r3", "new", None, T0 + 30 * MIN, 0, 2.0, 3),
    ]
    (tmp_path / "labels").mkdir()
    with open(tmp_path / "labels" / "part-0.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(LABEL_SCHEMA), labels)
    result = run_pit_join(str(tmp_path / "labels" / "*.avro"), tmp_path / "features", tmp_path / "training")
    assert sorted(result) == ["r1", "r2", "r3"]
    r1, r2, r3 = result["r1"], result["r2"], result["r3"]
    assert r1["position"] == 0 and r2["position"] is None and r1["weight"] == 1.0  # label fields carried over
    # No attached window ends after its impression, in any entity or window spec.
    for rec in result.values():
        for k, v in rec.items():
            if k.endswith("_window_end") and v is not None:
                assert v <= rec["impression_time"], (rec["request_id"], k)
    assert r1["user_1h_5m_window_end"] == T0 + 10 * MIN
    assert r1["user_1h_5m_n_impression"] == 1 and r1["user_1h_5m_n_click"] == 1 and r1["user_1h_5m_n_events"] == 2
    assert r1["user_1h_5m_ctr"] == pytest.approx(2 / 22)
    assert r1["item_1h_5m_distinct_users"] == 2 and r1["item_1h_5m_dwell_p50_ms"] == 4000.0
    assert r1["user_category_1h_5m_n_events"] == 2
    assert r1["user_24h_1h_window_end"] is None  # 24h/1h windows end at whole hours: 10:00 holds nothing yet
    # u1's first 1h/5m window ends at 10:05 (its first event is at 10:01): nothing ends by 10:04:59.999.
    assert r2["user_1h_5m_window_end"] is None and r2["user_1h_5m_n_events"] is None
    assert r2["item_1h_5m_window_end"] is None
    assert r3["user_1h_5m_ctr"] is None and r3["user_category_1h_5m_n_events"] is None
    assert r3["item_1h_5m_window_end"] == T0 + 30 * MIN and r3["item_1h_5m_n_events"] == 3


def test_pit_join_refuses_bad_labels(tmp_path, capsys):
    with open(tmp_path / "l.avro", "wb") as f:
        fastavro.writer(
            f,
            fastavro.parse_schema(
                {"type": "record", "name": "L", "fields": [{"name": "request_id", "type": "string"}]}
            ),
            [{"request_id": "r"}],
        )
    assert (
        pit_join.main(
            ["--labels", str(tmp_path / "l.avro"), "--features", str(tmp_path), "--output", str(tmp_path / "o")]
        )
        == pit_join.EXIT_CONFIG
    )
    assert "lacks required fields" in capsys.readouterr().err
    assert (
        pit_join.main(
            ["--labels", str(tmp_path / "none*.avro"), "--features", str(tmp_path), "--output", str(tmp_path / "o")]
        )
        == pit_join.EXIT_CONFIG
    )
