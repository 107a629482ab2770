"""Feature engineering: hand-computed values, sliding-window membership, Parquet output, late panes."""

import functools
import glob
import math
import os
import random

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Timestamp

from tests.conftest import FN_API_RUNNER
from tests.helpers import feature_event
from transforms.features import (
    FEATURE_COLUMNS,
    ROW_COLUMNS,
    ComputeFeatures,
    FeatureParams,
    FeaturesConfig,
    SlidingWindowSpec,
    WriteOfflineFeatures,
    _EntityInputListsFn,
    _EntityWindowCombineFn,
    arrow_schema,
    compute_all,
    compute_features,
    entity_inputs,
    entity_rows,
    feature_row,
    window_bounds,
)
from transforms.features_sink import _ParquetSink

T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z, a whole hour
MIN = 60_000
HOUR = 3_600_000
END = T0 + HOUR


ev = feature_event


# u1's hour [T0, T0 + 1h): 11 events; u2 and u3 touch i1 / an item without category.
EVENTS = [
    ev("e1", T0, "impression", item="i1", category="shoes"),
    ev("e2", T0 + 10 * MIN, "impression", item="i2", category="books"),
    ev("e3", T0 + 10 * MIN, "impression", item="i3", category="shoes"),
    ev("e4", T0 + 20 * MIN, "impression", item="i1", category="shoes"),
    ev("e5", T0 + 30 * MIN, "click", item="i1", category="shoes"),
    ev("e6", T0 + 30 * MIN, "dwell", item="i1", category="shoes", dwell=1000),
    ev("e7", T0 + 40 * MIN, "dwell", item="i2", category="books", dwell=2000),
    ev("e8", T0 + 45 * MIN, "view", item="i1", category="shoes", dwell=3000),
    ev("e9", T0 + 45 * MIN, "dwell", item="i3", category="shoes", dwell=10000),
    ev("e10", T0, "purchase", item="i1", category="shoes"),
    ev("e11", T0 + 50 * MIN, "scroll"),  # no item: user features only
    ev("e12", T0 + 5 * MIN, "impression", user="u2", item="i1", category="shoes"),
    ev("e13", T0 + 15 * MIN, "skip", user="u3", item="i9"),  # no item_meta -> category "unknown"
]
CFG = FeaturesConfig(windows=[{"size": "1h", "period": "30m"}], half_life="30m")


def test_config_defaults_and_labels():
    cfg = FeaturesConfig()
    assert [w.label for w in cfg.windows] == ["1h/5m", "24h/1h"]
    assert [w.slug for w in cfg.windows] == ["1h_5m", "24h_1h"]
    assert cfg.half_life == 6 * 3600 and cfg.ctr_prior_alpha == 1.0 and cfg.ctr_prior_beta == 20.0
    assert cfg.entities == ("user", "item", "user_category") and cfg.allowed_lateness == 0
    assert cfg.engagement_weights == {"click": 1, "dwell": 0.5, "add_to_cart": 3, "purchase": 5}
    assert SlidingWindowSpec(size="90s", period="30s").label == "90s/30s"


@pytest.mark.parametrize(
    "spec", [{"size": "1h", "period": 0}, {"size": "1h", "period": "7m"}, {"size": 0, "period": "5m"}]
)
def test_bad_window_specs(spec):
    with pytest.raises(ValueError):
        SlidingWindowSpec(**spec)


def test_bad_features_config():
    with pytest.raises(ValueError, match="unique"):
        FeaturesConfig(windows=[{"size": "1h", "period": "5m"}, {"size": "60m", "period": "300s"}])
    with pytest.raises(ValueError, match="unknown event types"):
        FeaturesConfig(engagement_weights={"clik": 1})
    with pytest.raises(ValueError):
        FeaturesConfig(half_life=0)
    with pytest.raises(ValueError):
        FeaturesConfig(entities=["session"])


def test_feature_columns_constant_matches_schema():
    assert [f.name for f in arrow_schema()] == [n for n, _ in ROW_COLUMNS]
    names = [n for n, _ in FEATURE_COLUMNS]
    assert names[:8] == [
        "n_impression",
        "n_click",
        "n_view",
        "n_dwell",
        "n_scroll",
        "n_skip",
        "n_add_to_cart",
        "n_purchase",
    ]
    assert set(names[8:]) == {
        "n_events",
        "ctr",
        "dwell_mean_ms",
        "dwell_p50_ms",
        "dwell_p90_ms",
        "distinct_items",
        "distinct_users",
        "recency_s",
        "decayed_engagement",
    }


def test_user_features_by_hand():
    row = compute_features("user", "u1", EVENTS, T0, END, CFG, "1h/30m")
    assert (row["entity_type"], row["entity_id"], row["window"], row["window_start"], row["window_end"]) == (
        "user",
        "u1",
        "1h/30m",
        T0,
        END,
    )
    assert {k: v for k, v in row.items() if k.startswith("n_")} == {
        "n_impression": 4,
        "n_click": 1,
        "n_view": 1,
        "n_dwell": 3,
        "n_scroll": 1,
        "n_skip": 0,
        "n_add_to_cart": 0,
        "n_purchase": 1,
        "n_events": 11,
    }
    assert row["ctr"] == pytest.approx((1 + 1) / (4 + 1 + 20))  # 0.08
    assert row["dwell_mean_ms"] == 4000.0  # [1000, 2000, 3000, 10000]
    assert row["dwell_p50_ms"] == 2500.0  # halfway between 2000 and 3000
    assert row["dwell_p90_ms"] == pytest.approx(7900.0)  # rank 2.7: 3000 + 0.7 * 7000
    assert row["distinct_items"] == 3 and row["distinct_users"] is None
    assert row["recency_s"] == 600.0  # last event (scroll) 10 min before the end
    # half-life 30 min: click and dwell 30 min before the end (x0.5), purchase 60 min (x0.25),
    # dwells 20 and 15 min before the end; impressions, views and scrolls weigh 0.
    expected = 1 * 0.5 + 0.5 * 0.5 + 5 * 0.25 + 0.5 * 2 ** (-20 / 30) + 0.5 * 2 ** (-15 / 30)
    assert row["decayed_engagement"] == pytest.approx(expected, rel=1e-12)


def test_item_and_user_category_features_by_hand():
    item = compute_features("item", "i1", EVENTS, T0, END, CFG)
    assert item["n_impression"] == 3 and item["n_click"] == 1 and item["n_events"] == 7
    assert item["ctr"] == pytest.approx(2 / 24)
    assert item["distinct_users"] == 2 and item["distinct_items"] is None
    assert item["dwell_p50_ms"] == 2000.0  # [1000, 3000]
    shoes = compute_features("user_category", "u1|shoes", EVENTS, T0, END, CFG)
    assert shoes["n_events"] == 8 and shoes["distinct_items"] == 2
    assert shoes["dwell_p50_ms"] == 3000.0 and shoes["dwell_p90_ms"] == pytest.approx(8600.0)  # rank 1.8
    assert shoes["recency_s"] == 15 * 60
    books = compute_features("user_category", "u1|books", EVENTS, T0, END, CFG)
    assert books["n_events"] == 2 and books["dwell_mean_ms"] == 2000.0
    unknown = compute_features("user_category", "u3|unknown", EVENTS, T0, END, CFG)
    assert unknown["n_skip"] == 1 and unknown["dwell_mean_ms"] is None and unknown["dwell_p90_ms"] is None
    assert unknown["decayed_engagement"] == 0.0 and unknown["ctr"] == pytest.approx(1 / 21)
    assert compute_features("user", "nobody", EVENTS, T0, END, CFG) is None


def test_window_bounds_are_half_open():
    # An event exactly at a window's end is in the next window, never in the one that ends there.
    early = compute_features("user", "u1", EVENTS, T0 - 30 * MIN, T0 + 30 * MIN, CFG)
    assert early["n_events"] == 5  # e1, e10, e2, e3, e4; e5 and e6 at T0 + 30 min are excluded
    assert early["n_click"] == 0 and early["n_dwell"] == 0
    assert compute_features("user", "u1", EVENTS, T0 - HOUR, T0, CFG) is None


def test_sliding_window_membership():
    spec = FeaturesConfig().windows[0]  # 1h/5m
    t = T0 + 10 * MIN + 1234
    bounds = window_bounds(t, spec.size_ms, spec.period_ms)
    assert len(bounds) == 12 and all(s <= t < e and e - s == HOUR for s, e in bounds)
    assert [s for s, _ in bounds] == [T0 + 10 * MIN - k * 5 * MIN for k in range(12)]
    at_boundary = window_bounds(T0, spec.size_ms, spec.period_ms)
    assert at_boundary[0] == (T0, T0 + HOUR) and at_boundary[-1] == (T0 - 55 * MIN, T0 + 5 * MIN)
    assert len(window_bounds(T0, 86_400_000, 3_600_000)) == 24
    # Same windows as Beam's SlidingWindows.
    beam_windows = window.SlidingWindows(spec.size, spec.period).assign(
        window.WindowFn.AssignContext(Timestamp(micros=t * 1000))
    )
    assert sorted((w.start.micros // 1000, w.end.micros // 1000) for w in beam_windows) == sorted(bounds)


def test_accumulators_merge_like_a_single_pass():
    params = FeatureParams.from_config(CFG)
    fn = _EntityWindowCombineFn(params)
    inputs = [v for e in EVENTS for (k, v) in entity_inputs(e, ("user",)) if k == ("user", "u1")]
    single = fn.add_input(fn.create_accumulator(), inputs[0])
    for v in inputs[1:]:
        single = fn.add_input(single, v)
    parts = [fn.create_accumulator() for _ in range(3)]
    for i, v in enumerate(reversed(inputs)):
        fn.add_input(parts[i % 3], v)
    merged = fn.merge_accumulators([parts[2], fn.create_accumulator(), parts[0], parts[1]])
    a, b = fn.extract_output(single), fn.extract_output(merged)
    assert a[:4] == b[:4]
    decayed = [s[5] * 0.5 ** ((END - s[4]) / params.half_life_ms) for s in (a, b)]
    assert decayed[0] == pytest.approx(decayed[1], rel=1e-12)


def test_entity_inputs():
    assert [k for k, _ in entity_inputs(EVENTS[0], ("user", "item", "user_category"))] == [
        ("user", "u1"),
        ("item", "i1"),
        ("user_category", "u1|shoes"),
    ]
    assert [k for k, _ in entity_inputs(EVENTS[10], ("user", "item", "user_category"))] == [("user", "u1")]
    assert entity_inputs(EVENTS[0], ("item",)) == [(("item", "i1"), ("impression", T0, None, "u1"))]


def _straightforward_entity_rows(entity_type, entity_id, values, specs, params):
    """entity_rows without its shortcuts: one `_EntityWindowCombineFn` accumulator per slot, folded in
    slot order into an accumulator per window with merge_accumulators, one `feature_row` per window."""
    fn = _EntityWindowCombineFn(params)
    slot = functools.reduce(math.gcd, (period for _, _, period in specs))
    slots = {}
    for value in values:
        fn.add_input(slots.setdefault(value[1] - value[1] % slot, fn.create_accumulator()), value)
    rows = []
    for label, size_ms, period_ms in specs:
        windows = {}
        for start, acc in sorted(slots.items()):
            for w_start, _ in window_bounds(start, size_ms, period_ms):
                fn.merge_accumulators([windows.setdefault(w_start, fn.create_accumulator()), acc])
        for w_start, acc in sorted(windows.items()):
            rows.append(
                feature_row(entity_type, entity_id, label, w_start, w_start + size_ms, fn.extract_output(acc), params)
            )
    return rows


def _random_events(seed, start_ms, n=600):
    """Few users and items over ~2 days, so entities share slots and windows; a hot user with a day of
    dwell events (enough values in a window for the numpy percentiles); events on slot boundaries, equal
    timestamps, missing items, categories and dwell values, an event type outside EVENT_TYPES."""
    rng = random.Random(seed)
    types = ["impression"] * 6 + ["click", "view", "dwell", "scroll", "skip", "add_to_cart", "purchase", "hover"]
    events = []
    for i in range(n):
        if i % 3 == 0:
            user, t = "hot", start_ms + rng.randrange(86_400_000)
            etype = "dwell" if rng.random() < 0.6 else rng.choice(types)
            dwell = rng.choice([rng.randrange(1, 60_000), rng.random() * 5000]) if etype == "dwell" else None
        else:
            user, t = (
                f"u{rng.randrange(12)}",
                start_ms + rng.choice([rng.randrange(2 * 86_400_000), rng.randrange(200) * 15 * MIN]),
            )
            etype = rng.choice(types)
            dwell = (
                rng.choice([None, rng.randrange(1, 60_000), rng.random() * 5000])
                if etype in ("dwell", "view")
                else None
            )
        item = rng.choice([None, "i1", "i2", "i3", "i4", "i5", "i6"])
        category = rng.choice([None, "shoes", "books"]) if item else None
        events.append(ev(f"e{i}", t, etype, user=user, item=item, category=category, dwell=dwell))
    return events


@pytest.mark.parametrize(
    "seed, start_ms, windows",
    [
        (1, T0, [{"size": "1h", "period": "15m"}, {"size": "24h", "period": "6h"}]),
        (2, T0 + 7 * MIN + 123, [{"size": "1h", "period": "15m"}, {"size": "24h", "period": "6h"}]),
        (3, T0 - 5 * HOUR - 1, [{"size": "1h", "period": "5m"}, {"size": "24h", "period": "1h"}]),
        (
            4,
            T0 + 1,
            [{"size": "90m", "period": "30m"}, {"size": "24h", "period": "20m"}, {"size": "10m", "period": "10m"}],
        ),
    ],
)
def test_entity_rows_equal_a_straightforward_recomputation(seed, start_ms, windows):
    """entity_rows (slots combined inline, merges and window-free columns shared by windows with the same
    slots) gives exactly the rows of plain per-window merges of `_EntityWindowCombineFn` accumulators:
    same rows in the same order, same values bit for bit, same key order; and the rows of compute_all."""
    cfg = FeaturesConfig(windows=windows, half_life="6h")
    params = FeatureParams.from_config(cfg)
    specs = tuple((spec.label, spec.size_ms, spec.period_ms) for spec in cfg.windows)
    events = _random_events(seed, start_ms)
    grouped = {}
    for event in events:
        for key, value in entity_inputs(event, cfg.entities):
            grouped.setdefault(key, []).append(value)
    rows = []
    for (entity_type, entity_id), values in grouped.items():
        fast = list(entity_rows(entity_type, entity_id, values, specs, params))
        expected = _straightforward_entity_rows(entity_type, entity_id, values, specs, params)
        assert [list(r.items()) for r in fast] == [list(r.items()) for r in expected]
        rows += fast
    assert max(row["n_dwell"] for row in rows) >= 64  # percentiles_sorted's numpy path
    _assert_rows_equal(rows, compute_all(events, cfg))


@pytest.mark.parametrize("max_inputs", [1, 7, 50_000])
def test_entity_input_lists_hold_every_input_in_event_order(max_inputs):
    """The bounded path's KeyByEntity: the lists it emits per entity (mid-bundle every `max_inputs`
    inputs, the rest when the bundle ends, in the global window) concatenate to that entity's
    `entity_inputs` in event order."""
    entities = ("user", "item", "user_category")
    events = _random_events(5, T0, n=120)
    fn = _EntityInputListsFn(entities, max_inputs=max_inputs)
    fn.start_bundle()
    emitted = [kv for event in events for kv in fn.process(event)]
    ended = list(fn.finish_bundle())
    assert all(wv.windows == (window.GlobalWindow(),) for wv in ended)
    emitted += [wv.value for wv in ended]
    keys = [key for key, _ in emitted]
    if max_inputs == 50_000:  # the bundle stays under the limit: one list per entity
        assert len(keys) == len(set(keys))
    else:
        assert len(keys) > len(set(keys))
    gathered, expected = {}, {}
    for key, values in emitted:
        gathered.setdefault(key, []).extend(values)
    for event in events:
        for key, value in entity_inputs(event, entities):
            expected.setdefault(key, []).append(value)
    assert gathered == expected


def _stamped(events):
    return [window.TimestampedValue(e, e["event_time"] / 1000) for e in events]


def _key(row):
    return row["entity_type"], row["entity_id"], row["window"], row["window_start"]


def _assert_rows_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(sorted(actual, key=_key), sorted(expected, key=_key)):
        assert a.keys() == e.keys()
        for k in a:
            if isinstance(e[k], float):
                assert a[k] == pytest.approx(e[k], rel=1e-9), (k, a, e)
            else:
                assert a[k] == e[k], (k, a, e)


@pytest.mark.parametrize("keyed_windows", [False, True], ids=["WindowInto", "keyed_windows"])
def test_pipeline_writes_partitioned_parquet(tmp_path, keyed_windows):
    """FnApiRunner: ComputeFeatures (both paths) equals the plain-Python reference, rows are in the
    global window (the windowed path's carry their window's max timestamp), and WriteOfflineFeatures
    writes one folder per UTC date of window_end (here: windows ending on Nov 1 and on Nov 2)."""
    late_evening = T0 + 13 * HOUR + 50 * MIN  # 23:50 UTC: its 1h windows end on both days
    events = EVENTS + [ev("n1", late_evening, "click", item="i1", category="shoes")]
    cfg = FeaturesConfig(windows=[{"size": "1h", "period": "30m"}, {"size": "2h", "period": "1h"}], half_life="30m")
    out = str(tmp_path / "features")
    with TestPipeline(runner=FN_API_RUNNER) as p:
        rows = p | beam.Create(_stamped(events)) | ComputeFeatures(cfg, keyed_windows=keyed_windows)
        files = rows | WriteOfflineFeatures(out)
        stamps = rows | "Stamps" >> beam.Map(
            lambda r, ts=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam: (
                keyed_windows or ts.micros == (r["window_end"] - 1) * 1000,
                w == window.GlobalWindow(),
            )
        )
        assert_that(
            stamps | "DistinctStamps" >> beam.Distinct(), equal_to([(True, True)]), label="MaxTimestampGlobalWindow"
        )
        partitions = files | "Partition" >> beam.Map(lambda path: os.path.basename(os.path.dirname(path)))
        assert_that(
            partitions | "DistinctPartitions" >> beam.Distinct(),
            equal_to(["date=2026-11-01", "date=2026-11-02"]),
            label="Partitions",
        )
    paths = sorted(glob.glob(os.path.join(out, "date=*", "*.parquet")))
    assert {os.path.basename(os.path.dirname(f)) for f in paths} == {"date=2026-11-01", "date=2026-11-02"}
    read = []
    for f in paths:
        table = pq.read_table(f)
        assert table.schema.equals(arrow_schema())
        part = os.path.basename(os.path.dirname(f))
        for row in table.to_pylist():
            assert part == "date=2026-11-02" if row["window_end"] >= T0 + 14 * HOUR else part == "date=2026-11-01"
            read.append(row)
    expected = compute_all(events, cfg)
    _assert_rows_equal(read, expected)
    # 1h/30m: each event is in 2 windows; the u1 hour [T0, T0 + 1h) is one of them.
    u1 = [r for r in read if _key(r) == ("user", "u1", "1h/30m", T0)]
    assert len(u1) == 1 and u1[0]["n_events"] == 11 and u1[0]["ctr"] == pytest.approx(0.08)


def test_parquet_sink_writes_rows_like_from_pylist(tmp_path):
    """The sink's column-wise conversion gives the table Table.from_pylist gives for the same rows, over
    several row groups; a row missing a column gets a null there, extra keys are ignored."""
    rows = compute_all(EVENTS, CFG)
    partial = {k: v for k, v in rows[0].items() if k != "dwell_p90_ms"}
    rows = [*rows, partial, {**rows[1], "not_a_column": 1}]
    path = tmp_path / "rows.parquet"
    sink = _ParquetSink(str(tmp_path), batch_rows=4)
    with open(path, "wb") as fh:
        sink.open(fh)
        for row in rows:
            sink.write(row)
        sink.flush()
    written = pq.read_table(path)
    assert pq.ParquetFile(path).num_row_groups == -(-len(rows) // 4)
    assert written.equals(pa.Table.from_pylist(rows, schema=arrow_schema()))
    assert written.to_pylist()[-2]["dwell_p90_ms"] is None


def test_late_but_allowed_event_updates_the_pane(tmp_path):
    """TestStream (BundleBasedDirectRunner, streaming): an on-time pane per window, then a late event
    within allowed_lateness re-fires both of its windows with the accumulated count; an event behind
    the watermark by more than the lateness is dropped (Beam gives no signal for that)."""
    cfg = FeaturesConfig(windows=[{"size": "2m", "period": "1m"}], entities=["user"], allowed_lateness="5m")
    b = T0 / 1000
    stream = (
        TestStream()
        .advance_watermark_to(b)
        .add_elements(_stamped([ev("a", T0 + 10_000, "click")]))
        .advance_watermark_to(b + 200)  # both windows of "a" close: on-time panes
        .add_elements(_stamped([ev("late", T0 + 20_000, "impression")]))  # 180 s late, allowed
        .advance_watermark_to(b + 1000)
        .add_elements(_stamped([ev("too_late", T0 + 30_000, "impression")]))  # beyond lateness
        .advance_watermark_to(b + 2000)
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(streaming=True)
    options.view_as(StandardOptions).runner = "BundleBasedDirectRunner"
    with TestPipeline(options=options) as p:
        rows = p | stream | ComputeFeatures(cfg, trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)))
        panes = rows | beam.Map(
            lambda r: (
                (r["window_start"] - T0) // 1000,
                r["window_end"] - r["window_start"],
                r["n_events"],
                r["n_click"],
                r["n_impression"],
            )
        )
        assert_that(
            panes,
            equal_to(
                [
                    (-60, 120_000, 1, 1, 0),
                    (0, 120_000, 1, 1, 0),  # on time
                    (-60, 120_000, 2, 1, 1),
                    (0, 120_000, 2, 1, 1),  # late panes, accumulated
                ]
            ),
        )
        _ = rows | WriteOfflineFeatures(str(tmp_path), streaming_window=60, allowed_lateness=300)
    # Windowed writes: the late pane gets its own file next to the on-time one (no overwrite).
    files = glob.glob(str(tmp_path / "date=2026-11-01" / "*.parquet"))
    written = sorted(r["n_events"] for f in files for r in pq.read_table(f).to_pylist())
    assert len(files) >= 2 and written == [1, 1, 2, 2]


def test_compute_features_rejects_bad_config():
    with pytest.raises(TypeError):
        ComputeFeatures({"windows": []})
    with pytest.raises(ValueError, match="bounded"):
        ComputeFeatures(CFG, trigger=trigger.AfterCount(1), keyed_windows=True)
    with pytest.raises(ValueError):
        WriteOfflineFeatures("")
