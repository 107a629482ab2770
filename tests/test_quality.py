"""Quality metrics, SLIs, SLO gates and drift (transforms/quality.py) and the baseline CLI, on hand-computed values."""

import copy
import json
import math

import numpy as np
import pytest

from pipelines import baseline as baseline_cli
from transforms import accounting
from transforms.quality import (
    EXIT_SLO_BREACH,
    QualityConfig,
    categorical_align,
    drift_report,
    entropy_bits,
    evaluate_slos,
    histogram_percentile,
    js_divergence,
    linf,
    psi,
    quality_summary,
    slo_exit_code,
)

EDGES = list(np.linspace(-4, 5, 19))  # fixed bucket edges for the generated numeric features


def hist(values, edges=EDGES) -> list[int]:
    """The stats convention: bucket i = (edges[i-1], edges[i]], first bucket <= edges[0], last = overflow."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(values), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).tolist()


def each_hour(hours=10, **fields) -> dict:
    """{hour key: fields} for the first `hours` hours of 2026-11-01; a callable field is called with the hour."""
    return {
        f"2026-11-01T{h:02d}:00:00Z": {k: v(h) if callable(v) else v for k, v in fields.items()} for h in range(hours)
    }


def make_stats(**over) -> dict:
    """A healthy run: every SLO met. Keyword arguments replace top-level keys."""
    stats = {
        "counts": {
            "valid": 9000,
            "duplicates": 500,
            "bots": 450,
            "dead_letter": 4,
            "consent_dropped": 45,
            "too_late": 1,
        },
        "input_records": 10000,
        "dead_letter_by_reason": {"malformed_json": 3, "bad_timestamp": 1},
        "bots_by_rule": {"crawler_user_agent": 300, "sustained_rate": 150},
        "labels": {
            "exposures": 4000,
            "labels": 4000,
            "positives": 400,
            "negatives": 3600,
            "orphan_outcomes": 40,
            "late_outcomes": 5,
            "coverage": 1.0,
        },
        "hourly": each_hour(input=1000, valid=900, bots=45, dead_letter=0, too_late=0, exposures=400, positives=40),
        "latency_ms": {"arrival_minus_event": {"edges": [100, 1000, 10000], "counts": [5000, 4000, 900, 100]}},
        "ctr_by_position": {
            "1": {"exposures": 1000, "positives": 200},
            "10": {"exposures": 100, "positives": 1},
            "2": {"exposures": 1000, "positives": 100},
        },
        "diversity": each_hour(exposure_items=200, exposure_entropy=7.0, positive_items=30, positive_entropy=4.5),
        "freshness": {
            "new": {"latest_event_time_ms": 1_000_000, "events": 10},
            "returning": {"latest_event_time_ms": 1_090_000, "events": 90},
        },
        "distributions": {
            "numeric": {"x": {"edges": EDGES, "counts": hist(np.random.default_rng(1).normal(0, 1, 20000))}},
            "categorical": {"device_class": {"desktop": 500, "mobile": 450, "tablet": 50}},
        },
        "run_end_ms": 1_100_000,
    }
    stats.update(over)
    return stats


def by_slo(rows):
    return {r["slo"]: r for r in rows}


# --- metrics -------------------------------------------------------------------------------


def test_entropy_bits():
    assert entropy_bits([1, 1]) == pytest.approx(1.0)
    assert entropy_bits([3, 3, 3, 3]) == pytest.approx(2.0)
    assert entropy_bits([1, 3]) == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))  # 0.811278
    assert entropy_bits([1, 3]) == pytest.approx(0.811278, abs=1e-6)
    assert entropy_bits([7, 0, 0]) == 0.0
    assert entropy_bits([]) == 0.0 and entropy_bits([0, 0]) == 0.0
    with pytest.raises(ValueError):
        entropy_bits([1, -1])


def test_histogram_percentile_linear_within_bucket():
    edges, counts = [10, 20, 30], [0, 10, 10, 0]  # 10 in (10, 20], 10 in (20, 30]
    assert histogram_percentile(edges, counts, 0.5) == pytest.approx(20.0)
    assert histogram_percentile(edges, counts, 0.25) == pytest.approx(15.0)
    assert histogram_percentile(edges, counts, 0.75) == pytest.approx(25.0)
    assert histogram_percentile(edges, counts, 0.95) == pytest.approx(29.0)
    assert histogram_percentile(edges, counts, 0.0) == pytest.approx(10.0)
    assert histogram_percentile(edges, counts, 1.0) == pytest.approx(30.0)
    # the first bucket starts at 0 (positive edges), or at `lower`
    assert histogram_percentile([100], [4, 0], 0.5) == pytest.approx(50.0)
    assert histogram_percentile([100], [4, 0], 0.5, lower=60) == pytest.approx(80.0)
    # overflow: reported as the last edge (a lower bound)
    assert histogram_percentile(edges, [0, 0, 0, 5], 0.5) == 30
    assert histogram_percentile(edges, [1, 0, 0, 99], 0.99) == 30
    assert histogram_percentile(edges, [0, 0, 0, 0], 0.5) is None


@pytest.mark.parametrize(
    "edges,counts,q", [([10, 20], [1, 1], 0.5), ([20, 10], [1, 1, 1], 0.5), ([10], [1, 1], 95), ([], [1], 0.5)]
)
def test_histogram_percentile_rejects_bad_input(edges, counts, q):
    with pytest.raises(ValueError):
        histogram_percentile(edges, counts, q)


def test_psi_hand_computed():
    # expected 50/50, actual 25/75: (0.25-0.5)ln(0.25/0.5) + (0.75-0.5)ln(0.75/0.5) = 0.25 ln 2 + 0.25 ln 1.5
    hand = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert hand == pytest.approx(0.274653, abs=1e-6)
    assert psi([50, 50], [25, 75], eps=0) == pytest.approx(hand, rel=1e-12)
    assert psi([50, 50], [25, 75]) == pytest.approx(hand, rel=1e-3)  # eps smoothing barely moves it
    # three bins: 0.1 ln 1.5 + 0 + (-0.1) ln 0.8 = 0.062861
    assert psi([20, 30, 50], [30, 30, 40], eps=0) == pytest.approx(0.1 * math.log(1.5) - 0.1 * math.log(0.8))
    assert psi([20, 30, 50], [30, 30, 40], eps=0) == pytest.approx(0.062861, abs=1e-6)
    assert psi([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)  # proportions, not counts
    assert psi([1, 3], [3, 1]) == pytest.approx(psi([3, 1], [1, 3]))  # symmetric


def test_psi_empty_bins():
    assert psi([10, 0], [5, 5], eps=0) == math.inf
    smoothed = psi([10, 0], [5, 5])
    assert math.isfinite(smoothed) and smoothed > 1
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        psi([0, 0], [1, 1])


def test_js_divergence():
    assert js_divergence([3, 1, 6], [3, 1, 6]) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([5, 5, 0, 0], [0, 0, 2, 8]) == pytest.approx(1.0)
    # P=[1,0], Q=[.5,.5], M=[.75,.25]: KL(P||M)=log2(4/3), KL(Q||M)=.5 log2(2/3) + .5 log2(2)
    hand = 0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5)
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(hand)
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(0.311278, abs=1e-6)


def test_linf_and_categorical_align():
    assert linf([1, 1], [1, 3]) == pytest.approx(0.25)
    assert linf([2, 2], [1, 1]) == 0.0
    a, b = categorical_align({"b": 2, "a": 1}, {"c": 4, "b": 3})
    assert (a, b) == ([1, 2, 0], [0, 3, 4])
    assert categorical_align({}, {}) == ([], [])
    assert categorical_align({1: 5, "x": 1}, {}) == ([5, 1], [0, 0])  # sorted by str


# --- drift ---------------------------------------------------------------------------------


def test_psi_detects_a_mean_shift_and_not_a_rerun():
    base = hist(np.random.default_rng(1).normal(0, 1, 20000))
    shifted = hist(np.random.default_rng(2).normal(1, 1, 20000))
    rerun = hist(np.random.default_rng(3).normal(0, 1, 20000))
    assert psi(base, shifted) > 0.2
    assert psi(base, rerun) < 0.1
    assert js_divergence(base, shifted) > 0.1 > js_divergence(base, rerun)


def _with_x(counts, categorical=None):
    return make_stats(
        distributions={
            "numeric": {"x": {"edges": EDGES, "counts": counts}},
            "categorical": categorical or {"device_class": {"desktop": 500, "mobile": 450, "tablet": 50}},
        }
    )


def test_drift_report_flags_the_shift_only():
    base = make_stats()
    shifted = _with_x(hist(np.random.default_rng(2).normal(1, 1, 20000)))
    rerun = _with_x(
        hist(np.random.default_rng(3).normal(0, 1, 20000)),
        {"device_class": {"desktop": 5020, "mobile": 4470, "tablet": 510}},
    )

    d = drift_report(shifted, base)
    x = d["features"]["x"]
    assert x["kind"] == "numeric" and x["comparable"] and x["psi"] > 0.2 and x["flags"]["psi"] and x["drifted"]
    assert d["drifted"] == ["x"]
    assert sum(x["baseline"]) == pytest.approx(1) and len(x["bins"]) == len(EDGES) + 1

    d = drift_report(rerun, base)
    assert d["features"]["x"]["psi"] < 0.1 and d["features"]["x"]["drifted"] is False
    dev = d["features"]["device_class"]
    assert dev["kind"] == "categorical" and dev["linf"] == pytest.approx(0.003) and dev["drifted"] is False
    assert d["drifted"] == []
    assert d["ctr_by_position"]["1"] == {"current": 0.2, "baseline": 0.2, "diff": 0.0}
    assert d["entropy"]["exposure_mean"]["diff"] == pytest.approx(0.0)


# Hand-sized inputs: compare them despite the minimum sample size a real run needs.
SMALL = QualityConfig.model_validate({"slos": {"drift_min_count": 1}})


def test_too_few_observations_are_not_compared():
    d = drift_report(
        make_stats(distributions={"numeric": {}, "categorical": {"c": {"a": 1, "b": 3}}}),
        make_stats(distributions={"numeric": {}, "categorical": {"c": {"a": 1, "b": 1}}}),
    )
    assert d["features"]["c"]["drifted"] is None and "too few observations" in d["features"]["c"]["message"]


def test_rare_categories_are_pooled():
    from transforms.quality import pool_rare

    a, b = pool_rare({"x": 980, "r1": 5, "r2": 5, "r3": 10}, {"x": 990, "r1": 0, "r4": 10}, 0.02)
    assert a == {"x": 980, "(other)": 20} and b == {"x": 990, "(other)": 10}


def test_drift_report_categorical_missing_and_incomparable():
    base = make_stats()
    cur = make_stats(
        distributions={
            "numeric": {"x": {"edges": EDGES[:-1], "counts": [1] * len(EDGES)}},  # edges changed
            "categorical": {
                "device_class": {"desktop": 50, "mobile": 20, "console": 30},  # new category
                "brand_new": {"a": 1},
            },
        }
    )
    d = drift_report(cur, base, QualityConfig.model_validate({"slos": {"linf_max": 0.25, "drift_min_count": 1}}))
    dev = d["features"]["device_class"]
    assert dev["bins"] == ["console", "desktop", "mobile", "tablet"]
    assert dev["flags"] == {"psi": True, "js": True, "linf": True} and dev["drifted"]
    assert dev["linf"] == pytest.approx(0.3)  # console: 0 -> 30%
    assert d["features"]["x"]["comparable"] is False and d["features"]["x"]["drifted"] is None
    assert "edges differ" in d["features"]["x"]["message"]
    assert (
        d["features"]["brand_new"]["drifted"] is None and "not in the baseline" in d["features"]["brand_new"]["message"]
    )

    gone = make_stats(distributions={"numeric": {}, "categorical": base["distributions"]["categorical"]})
    d = drift_report(gone, base, SMALL)
    assert d["features"]["x"]["drifted"] is True and d["features"]["x"]["flags"] == {"missing": True}
    rows = by_slo(evaluate_slos(gone, QualityConfig(), drift=d))
    assert rows["drift.missing_features"]["ok"] is False and "x" in rows["drift.missing_features"]["message"]


def test_linf_of_categorical_drift():
    d = drift_report(
        make_stats(distributions={"numeric": {}, "categorical": {"c": {"a": 1, "b": 3}}}),
        make_stats(distributions={"numeric": {}, "categorical": {"c": {"a": 1, "b": 1}}}),
        SMALL,
    )
    assert d["features"]["c"]["linf"] == pytest.approx(0.25)


# --- summary and SLOs ----------------------------------------------------------------------


def test_quality_summary_slis():
    s = quality_summary(make_stats())
    assert s["ingestion"]["success_rate"] == pytest.approx((9000 + 500 + 450 + 45) / 10000)
    assert s["ingestion"]["failed"] == {"dead_letter": 4, "too_late": 1} and s["accounting"]["holds"]
    lat = s["latency_ms"]  # 5000 in [0,100], 4000 in (100,1000], 900 in (1000,10000], 100 overflow
    assert lat["p50"] == pytest.approx(100.0)  # exactly the end of bucket 0
    assert lat["p95"] == pytest.approx(1000 + (9500 - 9000) / 900 * 9000)
    assert lat["p99"] == pytest.approx(10000.0) and not lat["p99_in_overflow"]
    assert s["labels"]["coverage"] == 1.0 and s["labels"]["orphan_ratio"] == pytest.approx(0.01)
    assert s["bots"]["ratio"] == pytest.approx(450 / 9450)
    assert s["bots"]["by_rule"]["sustained_rate"] == pytest.approx(150 / 9450)
    assert s["bots"]["hourly"]["2026-11-01T03:00:00Z"] == pytest.approx(45 / 945)
    assert s["freshness"]["new"]["age_ms"] == 100_000 and s["freshness"]["returning"]["age_ms"] == 10_000
    assert [r["position"] for r in s["ctr_by_position"]] == ["1", "2", "10"]
    assert s["ctr_by_position"][0]["ctr"] == pytest.approx(0.2)
    trend = s["entropy_trend"]
    assert len(trend["windows"]) == 6 and trend["windows"][-1] == "2026-11-01T09:00:00Z"
    assert trend["exposure_drop"] == pytest.approx(0.0)


def test_healthy_run_meets_every_slo():
    stats = make_stats()
    cfg = QualityConfig()
    rows = evaluate_slos(stats, cfg, drift=drift_report(stats, make_stats()))
    assert {r["slo"] for r in rows} == {
        "ingestion_success",
        "label_coverage",
        "orphan_ratio",
        "bot_ratio",
        "entropy_drop.exposure",
        "entropy_drop.positive",
        "drift.psi",
        "drift.js",
        "drift.missing_features",
    }
    assert all(r["ok"] is True for r in rows), [r for r in rows if not r["ok"]]
    assert all(set(r) == {"slo", "value", "threshold", "ok", "message"} for r in rows)
    assert slo_exit_code(rows, cfg) == 0


def test_ingestion_success_definition():
    # exactly the minimum: (990 + 5 + 3 + 1) / 1000 = 0.999 passes; dead letters and too_late are the failures
    counts = {"valid": 990, "duplicates": 5, "bots": 3, "consent_dropped": 1, "dead_letter": 1, "too_late": 0}
    row = by_slo(evaluate_slos(make_stats(counts=counts, input_records=1000)))["ingestion_success"]
    assert row["value"] == pytest.approx(0.999) and row["ok"] is True and row["threshold"] == 0.999
    counts = dict(counts, valid=989, too_late=1)
    row = by_slo(evaluate_slos(make_stats(counts=counts, input_records=1000)))["ingestion_success"]
    assert row["ok"] is False and "too_late 1" in row["message"]
    # a record the accounting misses is a failure too (numerator = successful outcomes, not input - failures)
    counts = dict(counts, valid=990, too_late=0)
    row = by_slo(evaluate_slos(make_stats(counts=counts, input_records=1001)))["ingestion_success"]
    assert row["ok"] is False and "unaccounted 1" in row["message"]
    row = by_slo(evaluate_slos(make_stats(counts=dict.fromkeys(counts, 0), input_records=0)))["ingestion_success"]
    assert row["ok"] is None and row["value"] is None


def test_breaches_fail_mode_and_warn_mode():
    stats = make_stats(
        counts={"valid": 8000, "duplicates": 0, "bots": 2500, "dead_letter": 100, "consent_dropped": 0, "too_late": 0},
        input_records=10600,
        labels={
            "exposures": 1000,
            "labels": 800,
            "positives": 80,
            "negatives": 720,
            "orphan_outcomes": 100,
            "late_outcomes": 0,
            "coverage": 0.8,
        },
        diversity=each_hour(
            exposure_items=100,
            exposure_entropy=lambda h: 6.0 if h < 9 else 5.0,
            positive_items=10,
            positive_entropy=3.0,
        ),
    )
    shifted = _with_x(hist(np.random.default_rng(2).normal(1, 1, 20000)))
    stats["distributions"] = shifted["distributions"]
    drift = drift_report(stats, make_stats())
    for mode in ("fail", "warn"):
        cfg = QualityConfig(mode=mode)
        rows = by_slo(evaluate_slos(stats, cfg, drift=drift))
        failed = {n for n, r in rows.items() if r["ok"] is False}
        assert failed == {
            "ingestion_success",
            "label_coverage",
            "orphan_ratio",
            "bot_ratio",
            "entropy_drop.exposure",
            "drift.psi",
            "drift.js",
        }
        assert rows["entropy_drop.exposure"]["value"] == pytest.approx(1.0)
        assert rows["bot_ratio"]["threshold"] == [0.0, 0.2] and rows["bot_ratio"]["value"] == pytest.approx(
            2500 / 10500
        )
        assert rows["drift.psi"]["message"].startswith("BREACH") and "x" in rows["drift.psi"]["message"]
        assert all(("warn mode" in r["message"]) == (mode == "warn") for r in rows.values() if r["ok"] is False)
        assert slo_exit_code(rows.values(), cfg) == (EXIT_SLO_BREACH if mode == "fail" else 0)
    assert EXIT_SLO_BREACH == 4


def test_bot_ratio_band_has_a_floor():
    cfg = QualityConfig.model_validate({"slos": {"bot_ratio_band": [0.01, 0.2]}})
    counts = dict(make_stats()["counts"], bots=0)
    row = by_slo(evaluate_slos(make_stats(counts=counts, input_records=9550), cfg))["bot_ratio"]
    assert row["value"] == 0.0 and row["ok"] is False


def test_disabled_gates_and_optional_gates():
    cfg = QualityConfig.model_validate(
        {
            "slos": {
                "ingestion_success_min": None,
                "label_coverage_min": None,
                "psi_max": None,
                "js_max": None,
                "bot_ratio_band": None,
                "entropy_drop_max": None,
                "orphan_ratio_max": None,
                "latency_p99_max": "5s",
                "freshness_max_age": "60s",
            }
        }
    )
    rows = by_slo(evaluate_slos(make_stats(), cfg))
    assert set(rows) == {"latency_p99", "freshness.new", "freshness.returning"}
    assert rows["latency_p99"]["threshold"] == 5000 and rows["latency_p99"]["ok"] is False  # p99 = 10 s
    assert rows["freshness.new"]["ok"] is False and rows["freshness.returning"]["ok"] is True
    # p99 in the overflow bucket cannot be shown to be under a threshold above the last edge
    stats = make_stats(latency_ms={"arrival_minus_event": {"edges": [100, 1000], "counts": [50, 40, 10]}})
    cfg = QualityConfig.model_validate({"slos": {"latency_p99_max": "1h"}})
    row = by_slo(evaluate_slos(stats, cfg))["latency_p99"]
    assert row["ok"] is False and "beyond the last bucket" in row["message"]


def test_not_evaluated_without_data_or_baseline():
    stats = make_stats(
        labels=accounting.label_summary({}),  # a run with no exposures
        diversity={
            "2026-11-01T00:00:00Z": {
                "exposure_items": 1,
                "exposure_entropy": 0.0,
                "positive_items": 0,
                "positive_entropy": 0.0,
            }
        },
    )
    rows = by_slo(evaluate_slos(stats, QualityConfig()))
    for name in ("label_coverage", "orphan_ratio", "entropy_drop.exposure", "drift.psi", "drift.js"):
        assert rows[name]["ok"] is None and rows[name]["message"].startswith("not evaluated"), name
    assert slo_exit_code(rows.values()) == 0
    orphans_only = copy.deepcopy(stats)
    orphans_only["labels"]["orphan_outcomes"] = 3
    assert by_slo(evaluate_slos(orphans_only))["orphan_ratio"]["ok"] is False


def test_quality_config_validation():
    cfg = QualityConfig.model_validate({"mode": "warn", "slos": {"latency_p99_max": "2m", "psi_max": None}})
    assert cfg.mode == "warn" and cfg.slos.latency_p99_max == 120.0 and cfg.slos.psi_max is None
    assert cfg.slos.entropy_windows == 6 and cfg.slos.bot_ratio_band == (0.0, 0.2)
    for bad in (
        {"mode": "panic"},
        {"slos": {"psi_max": -1}},
        {"slos": {"bot_ratio_band": [0.3, 0.1]}},
        {"slos": {"ingestion_success_min": 1.5}},
        {"slos": {"entropy_windows": 1}},
        {"slos": {"typo": 1}},
    ):
        with pytest.raises(ValueError):
            QualityConfig.model_validate(bad)


# --- baseline CLI --------------------------------------------------------------------------


def test_baseline_snapshot_round_trip(tmp_path, capsys):
    stats = make_stats()
    q = tmp_path / "run" / "quality.json"
    q.parent.mkdir()
    q.write_text(json.dumps(stats))
    out = tmp_path / "baseline.json"
    assert baseline_cli.main(["--quality", str(q), "--output", str(out)]) == 0
    assert "1 numeric, 1 categorical" in capsys.readouterr().out
    base = baseline_cli.load_baseline(str(out))
    assert base["distributions"] == json.loads(json.dumps(stats["distributions"]))
    assert base["entropy"] == {"windows": 10, "exposure_mean": 7.0, "positive_mean": 4.5}
    assert base["ctr_by_position"]["2"] == {"exposures": 1000, "positives": 100}
    # comparing with the snapshot is the same as comparing with the full run
    shifted = _with_x(hist(np.random.default_rng(2).normal(1, 1, 20000)))
    assert drift_report(shifted, base) == drift_report(shifted, stats)


def test_baseline_rejects_bad_input(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert baseline_cli.main(["--quality", str(missing), "--output", str(tmp_path / "b.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert baseline_cli.main(["--quality", str(bad), "--output", str(tmp_path / "b.json")]) == 2
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"counts": {}}))
    assert baseline_cli.main(["--quality", str(wrong), "--output", str(tmp_path / "b.json")]) == 2
    assert "no 'distributions'" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"distributions": {"numeric": {"x": {"edges": [1, 2], "counts": [1]}}}}))
    with pytest.raises(baseline_cli.BaselineError, match="len\\(counts\\)"):
        baseline_cli.load_baseline(str(broken))
