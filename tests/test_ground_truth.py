"""Generate -> batch job -> every count equals the generator's ground truth.

The generator knows what every line is (valid, duplicate copy, bot and which rule, dead letter and
which reason, consent opt-out). The job must reproduce it exactly, and its bot filter must meet the
budget: precision and recall reported, false positives under 0.5% of human events.
"""

import collections
import glob
import json

import fastavro
import pytest

from feedback_tools.generate import generate
from pipelines import batch
from tests.conftest import write_config

N_EVENTS = 40_000


def read_avro_ids(pattern):
    return [r["event_id"] for f in sorted(glob.glob(pattern)) for r in fastavro.reader(open(f, "rb"))]


def read_jsonl(pattern):
    return [json.loads(l) for f in sorted(glob.glob(pattern)) for l in open(f) if l.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truth")
    # With an arrival-time envelope, so the too-late rule and late outcomes are exercised too.
    truth = generate(N_EVENTS, str(tmp / "events.jsonl.gz"), seed=7, arrival_field="arrival_time")
    report = batch.run(
        [
            "--config",
            write_config(tmp, "time: {arrival_field: arrival_time, lateness: 1h}\n"),
            "--input",
            str(tmp / "events.jsonl.gz"),
            "--output",
            str(tmp / "out"),
        ]
    )
    return truth, report, tmp / "out"


def test_counts_equal_ground_truth(run):
    truth, report, _ = run
    assert report["accounting"]["holds"] and report["accounting"]["input_records"] == truth["input_records"]
    assert report["counts"] == truth["counts"]
    assert report["dead_letter_by_reason"] == {k: v for k, v in truth["dead_letter_by_reason"].items() if v}
    assert set(report["dead_letter_by_reason"]) >= {
        "malformed_json",
        "bad_encoding",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "bad_timestamp",
        "unknown_event_type",
        "out_of_range",
        "oversize_payload",
        "schema_violation",
    }


def test_labels_equal_ground_truth(run):
    truth, report, out = run
    t, r = truth["labels"], report["labels"]
    print(f"\nlabels: {r}")
    assert r["one_label_per_exposure"] and r["exposures"] == t["exposures"]
    assert (r["positives"], r["negatives"]) == (t["positives"], t["negatives"])
    assert (r["orphan_outcomes"], r["late_outcomes"]) == (t["orphan_outcomes"], t["late_outcomes"])
    assert t["late_outcomes"] > 0 and t["orphan_outcomes"] > 0 and truth["counts"]["too_late"] > 0
    positives = sorted(
        l["label_id"]
        for f in glob.glob(str(out / "labels" / "*.avro"))
        for l in fastavro.reader(open(f, "rb"))
        if l["label"]
    )
    assert positives == t["positive_label_ids"]


def test_bot_precision_recall_within_budget(run):
    truth, report, out = run
    flagged = set(read_avro_ids(str(out / "bots" / "*.avro")))
    actual = set(truth["bot_event_ids"])
    tp = len(flagged & actual)
    precision = tp / len(flagged)
    recall = tp / len(actual)
    humans = truth["counts"]["valid"] + len(flagged - actual)
    fp_rate = len(flagged - actual) / humans
    print(f"\nbots: precision {precision:.4f} recall {recall:.4f} false-positive rate {fp_rate:.4%}")
    assert fp_rate < 0.005
    assert recall >= 0.95 and precision >= 0.99
    assert report["bots_by_rule"] == {k: v for k, v in truth["bots_by_rule"].items() if v}


def test_no_valid_human_event_lost_and_duplicates_removed_once(run):
    truth, _, out = run
    valid = read_avro_ids(str(out / "events" / "*.avro"))
    assert len(valid) == len(set(valid)) == truth["counts"]["valid"]
    assert not set(valid) & set(truth["bot_event_ids"])
    assert not set(valid) & set(truth["consent_dropped_event_ids"])
    dups = collections.Counter(d["event_id"] for d in read_jsonl(str(out / "duplicates" / "*.jsonl")))
    assert dups == collections.Counter(truth["duplicate_event_ids"])
    bots = set(read_avro_ids(str(out / "bots" / "*.avro")))
    # every duplicated event survives exactly once, as a valid event or a bot
    assert all((e in bots) != (e in set(valid)) for e in dups)


def test_no_raw_pii_in_any_output(run):
    truth, _, out = run
    text = "".join(open(f, "rb").read().decode("latin-1") for f in glob.glob(str(out / "**" / "*.*"), recursive=True))
    import re

    assert not re.search(r"[A-Za-z0-9._%+-]+@example\.(com|org|net)", text)
    assert "+1 415 555" not in text


def test_machine_cadence_false_positives_on_generated_humans(run):
    """The cadence rule alone, on every run of the generator's human users (valid events): under 0.5%."""
    from transforms.bots import machine_cadence
    from transforms.config import BotConfig
    from transforms.sessions import split_by_gap

    _, _, out = run
    b = BotConfig()
    by_user = collections.defaultdict(list)
    for f in sorted(glob.glob(str(out / "events" / "*.avro"))):
        for r in fastavro.reader(open(f, "rb")):
            t = r["event_time"]
            by_user[r["user_id"]].append({"event_time": int(t.timestamp() * 1000) if hasattr(t, "timestamp") else t})
    flagged = total = runs = 0
    for events in by_user.values():
        events.sort(key=lambda e: e["event_time"])
        for run_ in split_by_gap(events, int(b.session_gap * 1000)):
            runs += 1
            total += len(run_)
            if machine_cadence(
                (e["event_time"] for e in run_),
                b.cadence_max_cv,
                b.cadence_min_events,
                b.cadence_min_rate_per_s,
                b.cadence_min_duration * 1000,
            ):
                flagged += len(run_)
    rate = flagged / total
    print(f"\nmachine_cadence on {total} human events in {runs} runs: false-positive rate {rate:.4%}")
    assert total > 10_000 and rate < 0.005


def test_bot_precision_recall_per_rule(run):
    """Each rule against the generator's intent (truth names the rule each bot user was built to trip)."""
    from feedback_tools.demo import flagged_rules, precision_recall_by_rule

    truth, _, out = run
    rows = precision_recall_by_rule(flagged_rules(out), truth["bot_event_ids_by_rule"])
    for rule, (tp, n_flagged, n_meant, precision, recall) in rows.items():
        print(f"\n{rule}: precision {precision} recall {recall} ({tp} of {n_flagged} flagged, {n_meant} intended)")
    assert rows["machine_cadence"][2] > 0
    assert all(precision == 1.0 and recall == 1.0 for _, _, n, precision, recall in rows.values() if n)
