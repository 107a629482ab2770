"""Tests of the synthetic traffic generator (feedback_tools/generate.py) and its ground truth.

The truth is checked against an independent, minimal re-implementation of the contract
(`_classify`), not against the pipeline, so these tests stay meaningful while it changes.
"""

from __future__ import annotations

import collections
import datetime as dt
import gzip
import json
import os
import statistics
import subprocess
import sys
import time

import crawleruseragents
import fastavro
import orjson
import pytest

from feedback_tools import generate as gen
from feedback_tools import sample_agents
from tests.conftest import ROOT
from transforms import contract as C

IMPRESSION, CLICK = "impression", "click"
assert IMPRESSION in C.DEFAULT_EVENT_TYPES and CLICK in C.DEFAULT_EVENT_TYPES

_V2_FIELDS = set(C.REQUIRED_FIELDS) | set(C.OPTIONAL_FIELDS)
_V1_FIELDS = _V2_FIELDS - {"experiment_id", "variant", "context"}
_STR = (str,)
_TYPES = {
    "event_id": _STR,
    "event_type": _STR,
    "item_id": _STR,
    "request_id": _STR,
    "session_id": _STR,
    "policy": _STR,
    "user_agent": _STR,
    "ip": _STR,
    "experiment_id": _STR,
    "variant": _STR,
    "position": (int,),
    "dwell_ms": (int,),
    "schema_version": (int,),
    "propensity": (int, float),
    "value": (int, float),
    "consent": (bool,),
    "user_id": (str, int),
}
_MIN_MS = 946_684_800_000  # 2000-01-01


def _time_ms(value):
    """Epoch ms from an int or an ISO string with offset; None if not a valid time."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        if t.tzinfo is None:
            return None
        return int(t.timestamp() * 1000 + (0.5 if t.timestamp() >= 0 else -0.5))
    return None


def _classify(payload, max_ms):
    """(outcome or reason code, event dict or None, event_time ms or None) for one record."""
    if isinstance(payload, bytes):
        if len(payload) > gen.OVERSIZE_BYTES:
            return C.OVERSIZE_PAYLOAD, None, None
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return C.BAD_ENCODING, None, None
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            return C.MALFORMED_JSON, None, None
    else:
        obj = dict(payload)
        if isinstance(obj.get("event_time"), dt.datetime):
            obj["event_time"] = int(obj["event_time"].timestamp() * 1000)
        obj = {k: v for k, v in obj.items() if v is not None}
    if not isinstance(obj, dict):
        return C.NOT_AN_OBJECT, None, None
    if obj.get("consent") is False:
        return C.OUTCOME_CONSENT_DROPPED, obj, _time_ms(obj.get("event_time"))
    version = obj.get("schema_version", 2)
    if not isinstance(version, int) or isinstance(version, bool):
        return C.WRONG_TYPE, None, None
    if version not in (1, 2) or set(obj) - (_V1_FIELDS if version == 1 else _V2_FIELDS):
        return C.SCHEMA_VIOLATION, None, None
    if any(obj.get(f) in (None, "") for f in C.REQUIRED_FIELDS):
        return C.MISSING_FIELD, None, None
    for name, value in obj.items():
        types = _TYPES.get(name)
        if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return C.WRONG_TYPE, None, None
        if name == "context" and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            return C.WRONG_TYPE, None, None
    ms = _time_ms(obj["event_time"])
    if ms is None or not _MIN_MS <= ms <= max_ms:
        return C.BAD_TIMESTAMP, None, None
    if obj["event_type"] not in C.DEFAULT_EVENT_TYPES:
        return C.UNKNOWN_EVENT_TYPE, None, None
    p = obj.get("propensity")
    if (p is not None and not 0 < p <= 1) or any(obj.get(f, 0) < 0 for f in ("position", "dwell_ms", "value")):
        return C.OUT_OF_RANGE, None, None
    return "ok", obj, ms


def _read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def _analyse(payloads, truth):
    """Re-derive the truth from the records, in arrival order."""
    max_ms = _time_ms(truth["event_time_range"][1]) + 86_400_000
    reasons, consent_ids, dups, first = collections.Counter(), [], collections.Counter(), {}
    events = []  # first copies of ok events, arrival order
    for p in payloads:
        outcome, obj, ms = _classify(p, max_ms)
        if outcome == C.OUTCOME_CONSENT_DROPPED:
            consent_ids.append(obj["event_id"])
        elif outcome != "ok":
            reasons[outcome] += 1
        elif obj["event_id"] in first:
            dups[obj["event_id"]] += 1
            assert first[obj["event_id"]] == p, "a retried copy differs from the first copy"
        else:
            first[obj["event_id"]] = p
            obj = dict(obj, event_time=ms, user_id=str(obj["user_id"]))
            events.append(obj)
    return reasons, consent_ids, dups, events


def _runs(events, gap_ms=10 * 60_000):
    """Per user, its events in time order split at inactivity gaps."""
    by_user = collections.defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    out = collections.defaultdict(list)
    for u, evs in by_user.items():
        evs.sort(key=lambda e: e["event_time"])
        run = [evs[0]]
        for a, b in zip(evs, evs[1:]):
            if b["event_time"] - a["event_time"] >= gap_ms:
                out[u].append(run)
                run = []
            run.append(b)
        out[u].append(run)
    return out


def _max_in_window(times, window_ms=60_000):
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] < t - window_ms:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _click_latencies(events):
    shown = {}
    for e in events:
        if e["event_type"] == IMPRESSION:
            shown[e.get("request_id"), e["item_id"]] = e["event_time"]
    return [
        e["event_time"] - shown[e["request_id"], e["item_id"]]
        for e in events
        if e["event_type"] == CLICK and e.get("request_id") and (e["request_id"], e["item_id"]) in shown
    ]


@pytest.fixture(scope="module")
def run20k(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "events.jsonl"
    truth = gen.generate(20_000, path, seed=1)
    payloads = _read_jsonl(path)
    return path, truth, payloads, _analyse(payloads, truth)


# --- tests ---------------------------------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path):
    for ext in ("jsonl", "jsonl.gz", "avro"):
        a, b, c = (tmp_path / f"{name}.{ext}" for name in "abc")
        gen.generate(3000, a, seed=11)
        gen.generate(3000, b, seed=11)
        gen.generate(3000, c, seed=12)
        assert a.read_bytes() == b.read_bytes(), ext
        assert a.read_bytes() != c.read_bytes(), ext
        assert (tmp_path / f"a.{ext}.truth.json").read_bytes() == (tmp_path / f"b.{ext}.truth.json").read_bytes()


def test_avro_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """Separate processes (the demo, the ground-truth tests) must write the same file: string hashing,
    and so set order, changes with PYTHONHASHSEED."""
    digests = set()
    for hash_seed in ("1", "2"):
        out = tmp_path / f"h{hash_seed}.avro"
        subprocess.run(
            [sys.executable, "-m", "feedback_tools.generate", "--events", "200", "--seed", "5", "--output", str(out)],
            check=True,
            capture_output=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        digests.add(out.read_bytes())
    assert len(digests) == 1


@pytest.mark.parametrize("n", [0, 1, 9, 250])
def test_exact_record_count_for_small_n(tmp_path, n):
    path = tmp_path / "small.jsonl"
    truth = gen.generate(n, path, seed=3)
    assert truth["input_records"] == n == sum(truth["counts"].values())
    assert len(path.read_bytes().splitlines()) == n


def test_truth_is_consistent_and_sums_to_lines(run20k):
    path, truth, payloads, _ = run20k
    assert truth["input_records"] == len(payloads) == 20_000
    assert json.loads((path.parent / (path.name + ".truth.json")).read_text()) == truth
    c = truth["counts"]
    assert set(c) == set(C.OUTCOMES) and sum(c.values()) == truth["input_records"]
    assert sum(truth["dead_letter_by_reason"].values()) == c[C.OUTCOME_DEAD_LETTER]
    assert sum(truth["bots_by_rule"].values()) == c[C.OUTCOME_BOT] == len(truth["bot_event_ids"])
    assert sum(truth["duplicate_event_ids"].values()) == c[C.OUTCOME_DUPLICATE]
    assert len(truth["consent_dropped_event_ids"]) == c[C.OUTCOME_CONSENT_DROPPED]
    assert sum(truth["valid_event_count_by_type"].values()) == c[C.OUTCOME_VALID]
    assert set(truth["valid_event_count_by_type"]) == set(C.DEFAULT_EVENT_TYPES)
    assert truth["bot_event_ids"] == sorted(truth["bot_event_ids"])
    assert all(isinstance(u, str) for u in truth["bot_user_ids"])
    # default proportions
    n = truth["input_records"]
    assert 0.04 <= c[C.OUTCOME_BOT] / n <= 0.065
    assert 0.012 <= c[C.OUTCOME_DEAD_LETTER] / n <= 0.018
    assert 0.02 <= c[C.OUTCOME_DUPLICATE] / n <= 0.045
    assert all(truth["bots_by_rule"][r] > 0 for r in C.BOT_RULES)
    assert c[C.OUTCOME_CONSENT_DROPPED] > 0
    assert all(p and not p.isspace() for p in payloads), "blank lines"


def test_truth_matches_an_independent_classification(run20k):
    _, truth, _, (reasons, consent_ids, dups, events) = run20k
    assert all(reasons[r] > 0 for r in gen.JSON_REASONS), reasons
    assert dict(reasons) == {r: v for r, v in truth["dead_letter_by_reason"].items() if v}
    assert sorted(consent_ids) == truth["consent_dropped_event_ids"]
    assert dict(dups) == truth["duplicate_event_ids"]
    bots = set(truth["bot_event_ids"])
    assert bots <= {e["event_id"] for e in events}
    valid = collections.Counter(e["event_type"] for e in events if e["event_id"] not in bots)
    assert {t: valid[t] for t in C.DEFAULT_EVENT_TYPES} == truth["valid_event_count_by_type"]
    bot_users = set(truth["bot_user_ids"])
    assert bot_users == {e["user_id"] for e in events if e["event_id"] in bots}
    assert all(e["event_id"] in bots for e in events if e["user_id"] in bot_users)
    lo, hi = (_time_ms(x) for x in truth["event_time_range"])
    assert all(lo <= e["event_time"] <= hi for e in events)
    # v1 records never carry v2-only fields (checked by _classify), and there are some of each
    versions = collections.Counter(e.get("schema_version", 2) for e in events)
    assert versions[1] > 0.1 * len(events) and versions[2] > 0.6 * len(events)


def test_user_agents_and_bot_rules(run20k):
    _, truth, _, (_, _, _, events) = run20k
    sample_agents.check_agents()
    assert len(sample_agents.HUMAN_AGENTS) >= 35 and len(sample_agents.CRAWLER_AGENTS) >= 15
    bot_users = set(truth["bot_user_ids"])
    is_crawler = {}
    for e in events:
        ua = e["user_agent"]
        if ua not in is_crawler:
            is_crawler[ua] = crawleruseragents.is_crawler(ua)
    assert not any(is_crawler[e["user_agent"]] for e in events if e["user_id"] not in bot_users)
    assert all(e["user_agent"] in sample_agents.HUMAN_AGENTS for e in events if e["user_id"] not in bot_users)
    runs = _runs([e for e in events if e["user_id"] in bot_users])
    per_rule = collections.Counter()
    for user_runs in runs.values():
        evs = [e for run in user_runs for e in run]
        if is_crawler[evs[0]["user_agent"]]:
            assert all(is_crawler[e["user_agent"]] for e in evs)
            assert _max_in_window([e["event_time"] for e in evs]) <= 60
            per_rule[C.BOT_RULE_CRAWLER_UA] += len(evs)
            continue
        assert evs[0]["user_agent"] in sample_agents.HUMAN_AGENTS
        lat = _click_latencies(evs)
        if lat and max(lat) <= 150:
            for run in user_runs:  # every session: >= 5 clicks, 10-150 ms, <= 20 events/min
                run_lat = _click_latencies(run)
                assert len(run_lat) >= 5 and all(10 <= x <= 150 for x in run_lat)
                assert _max_in_window([e["event_time"] for e in run]) <= 20
            per_rule[C.BOT_RULE_SUPERHUMAN_CLICKS] += len(evs)
        elif not lat and all(e["event_type"] in (gen.VIEW, gen.SCROLL) for e in evs):
            # a steady crawler: one run, a view every 0.7-1.6 s with a little jitter, 3-10 min
            assert len(user_runs) == 1
            gaps = [b["event_time"] - a["event_time"] for a, b in zip(evs, evs[1:])]
            span_s = (evs[-1]["event_time"] - evs[0]["event_time"]) / 1000
            assert 3 * 60 - 2 <= span_s <= 10 * 60 + 2 and 0.6 <= len(evs) / span_s <= 1.5
            assert statistics.pstdev(gaps) / statistics.fmean(gaps) < 0.1
            per_rule[C.BOT_RULE_MACHINE_CADENCE] += len(evs)
        else:
            assert len(user_runs) == 1 and all(x >= 400 for x in lat)
            span_s = (evs[-1]["event_time"] - evs[0]["event_time"]) / 1000
            assert 3 * 60 - 2 <= span_s <= 20 * 60 + 2
            assert 3 <= len(evs) / span_s <= 8
            per_rule[C.BOT_RULE_SUSTAINED_RATE] += len(evs)
    assert dict(per_rule) == {r: v for r, v in truth["bots_by_rule"].items() if v}


def test_human_pacing_and_click_latency(run20k):
    _, truth, payloads, (_, _, _, events) = run20k
    bot_users = set(truth["bot_user_ids"])
    humans = [e for e in events if e["user_id"] not in bot_users]
    by_user = collections.defaultdict(list)
    for e in humans:
        by_user[e["user_id"]].append(e)
    assert len(by_user) > 100
    for user, evs in by_user.items():
        assert _max_in_window([e["event_time"] for e in evs]) <= 60, user
        assert _max_in_window([e["event_time"] for e in evs if e["event_type"] != IMPRESSION]) <= 30, user
        assert all(x >= 400 for x in _click_latencies(evs)), user
        for run in _runs(evs, gap_ms=40 * 60_000)[user]:  # requests >= 15 s apart in a session
            starts = sorted({e["event_time"] for e in run if e["event_type"] == IMPRESSION and e["position"] == 1})
            assert all(b - a >= 15_000 for a, b in zip(starts, starts[1:])), user
    imps = [e for e in humans if e["event_type"] == IMPRESSION]
    assert all(0 < e["propensity"] <= 1 and 1 <= e["position"] <= 12 for e in imps)
    numeric = sum(1 for p in payloads if b'"user_id":' in p and p.split(b'"user_id":', 1)[1][:1].isdigit())
    assert 0.03 * len(payloads) < numeric < 0.2 * len(payloads)


def test_late_arrivals(run20k):
    _, truth, payloads, (_, _, _, events) = run20k
    late = truth["late_event_ids"]
    assert 0.01 * len(events) < len(late) < 0.04 * len(events)
    assert set(late) <= {e["event_id"] for e in events} | set(truth["consent_dropped_event_ids"])
    assert all(120 <= s <= 90 * 60 or 3 * 3600 <= s <= 12 * 3600 for s in late.values())
    # arrival order != event-time order, but only by the delays
    times = [e["event_time"] for e in events]
    assert times != sorted(times)


def test_jsonl_gz_round_trip(tmp_path):
    path = tmp_path / "events.jsonl.gz"
    truth = gen.generate(5000, path, seed=5)
    payloads = _read_jsonl(path)
    assert len(payloads) == truth["input_records"] == 5000
    reasons, consent_ids, dups, _ = _analyse(payloads, truth)
    assert dict(reasons) == {r: v for r, v in truth["dead_letter_by_reason"].items() if v}
    assert dict(dups) == truth["duplicate_event_ids"]


def test_avro_round_trip(tmp_path):
    path = tmp_path / "events.avro"
    truth = gen.generate(8000, path, seed=5)
    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        assert reader.writer_schema["name"].endswith("Event")
        records = list(reader)
    assert len(records) == truth["input_records"] == 8000
    assert all(isinstance(r["user_id"], str) and r["schema_version"] == 2 for r in records)
    reasons, consent_ids, dups, events = _analyse(records, truth)
    assert set(reasons) == set(gen.AVRO_REASONS)
    assert dict(reasons) == {r: v for r, v in truth["dead_letter_by_reason"].items() if v}
    assert sorted(consent_ids) == truth["consent_dropped_event_ids"]
    assert dict(dups) == truth["duplicate_event_ids"]
    assert len(events) + sum(dups.values()) + sum(reasons.values()) + len(consent_ids) == len(records)


def test_cli(tmp_path, capsys):
    path = tmp_path / "cli.jsonl"
    assert (
        gen.main(
            [
                "--events",
                "500",
                "--output",
                str(path),
                "--seed",
                "1",
                "--start",
                "2026-11-02T00:00:00Z",
                "--knob",
                "bot_fraction=0.04",
            ]
        )
        == 0
    )
    truth = json.loads((tmp_path / "cli.jsonl.truth.json").read_text())
    assert truth["input_records"] == 500 and truth["seed"] == 1
    assert truth["event_time_range"][0] >= "2026-11-02T00:00:00"
    assert truth["arrival_field"] is None and truth["counts"][C.OUTCOME_TOO_LATE] == 0
    with pytest.raises(TypeError):
        gen.generate(10, tmp_path / "x.jsonl", no_such_knob=1)
    with pytest.raises(ValueError):
        gen.generate(10, tmp_path / "x.csv")


def test_cli_arrival_field(tmp_path):
    path = tmp_path / "stamped.jsonl"
    assert (
        gen.main(
            [
                "--events",
                "3000",
                "--output",
                str(path),
                "--seed",
                "2",
                "--arrival-field",
                "received_at",
                "--lateness",
                "1800",
            ]
        )
        == 0
    )
    truth = json.loads((tmp_path / "stamped.jsonl.truth.json").read_text())
    assert truth["arrival_field"] == "received_at" and truth["lateness_s"] == 1800
    assert (
        sum(truth["counts"].values())
        == 3000
        == len(truth["too_late_event_ids"]) + sum(v for k, v in truth["counts"].items() if k != C.OUTCOME_TOO_LATE)
    )
    stamped = [p for p in _read_jsonl(path) if p.startswith(b'{"received_at":')]
    assert len(stamped) > 0.98 * 3000
    arrivals = [int(p.split(b":", 1)[1].split(b",", 1)[0]) for p in stamped]
    assert arrivals == sorted(arrivals)
    assert set(truth["labels"]) == {
        "exposures",
        "positives",
        "negatives",
        "positive_label_ids",
        "by_outcome",
        "orphan_outcomes",
        "late_outcomes",
    }
    assert set(truth["labels_intended"]) >= set(truth["labels"])


def test_speed_smoke(tmp_path):
    t0 = time.perf_counter()
    truth = gen.generate(200_000, tmp_path / "speed.jsonl", seed=1)
    dt_s = time.perf_counter() - t0
    assert truth["input_records"] == 200_000
    print(f"\ngenerate: 200000 records in {dt_s:.2f}s = {200_000 / dt_s:,.0f} records/s")


@pytest.mark.parametrize(
    "seed,start", [(1, "2026-11-01T00:00:00Z"), (2, "2026-12-31T23:59:30Z"), (3, "2027-06-15T13:47:11Z")]
)
def test_every_seed_and_start_has_steady_crawlers_and_boundary_runs(tmp_path, seed, start):
    """Steady unknown-UA crawlers and bot runs / human sessions across an hour and a UTC midnight are
    in every sample, so the demo and the tests always meet them."""
    path = tmp_path / "e.jsonl"
    truth = gen.generate(4000, str(path), seed=seed, start=start)
    assert truth["bots_by_rule"][C.BOT_RULE_MACHINE_CADENCE] >= 100
    events = []
    for line in path.read_bytes().splitlines():
        try:
            e = orjson.loads(line)
            e["event_time"] = _time_ms(e["event_time"])
        except Exception:  # the deliberate dead letters
            continue
        if isinstance(e.get("user_id"), (str, int)) and isinstance(e["event_time"], int):
            events.append(e)
    bot_users = set(truth["bot_user_ids"])
    start_ms = _time_ms(start)
    midnight = (start_ms // 86_400_000 + 1) * 86_400_000

    def crosses(run, step):
        return any(a["event_time"] // step != b["event_time"] // step for a, b in zip(run, run[1:]))

    runs = _runs(events)
    bot_runs = [r for u, rs in runs.items() if str(u) in bot_users for r in rs]
    human_runs = [r for u, rs in runs.items() if str(u) not in bot_users for r in rs]
    assert any(crosses(r, 86_400_000) and r[0]["event_time"] < midnight <= r[-1]["event_time"] for r in bot_runs)
    assert sum(crosses(r, 3_600_000) for r in bot_runs) >= 2
    assert any(crosses(r, 86_400_000) for r in human_runs)
    assert _time_ms(truth["event_time_range"][0]) >= start_ms
