"""The generator's too-late and label truth against the pipeline's own functions.

Both files come from one seed, with and without the arrival-time envelope. Every record is put
through `transforms.parse.parse_record` (the arrival field and the too-late rule included), first
copies are kept in arrival order, bots are set aside by the truth's bot users, and the label truth
is recomputed with `transforms.labels.settle` over the valid human events grouped by
(user_id, item_id). The generator computes its `labels` without Beam, from its own record of what
it emitted; `labels_intended` comes from what caused each outcome, and differs from the rule only
in the ambiguous cases it counts.
"""

from __future__ import annotations

import collections
import dataclasses

import orjson
import pytest

from feedback_tools import generate as gen
from transforms import contract as C
from transforms.config import LabelsConfig
from transforms.labels import LabelRules, settle, split_events
from transforms.parse import ConsentWithdrawn, Rejected, TooLate, parse_record

N = 20_000
SEED = 1
FIELD = "_arrival_ms"
LATENESS_S = 3600


def _lines(path):
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels")
    out = {}
    for name, field in (("plain", None), ("arrival", FIELD)):
        path = tmp / f"{name}.jsonl"
        truth = gen.generate(N, path, seed=SEED, arrival_field=field, lateness_s=LATENESS_S)
        out[name] = (truth, _lines(path))
    return out


def _replay(lines, truth, rules, field):
    """Classify every record as the pipeline would; return counts, too-late ids, valid human events."""
    vr = dataclasses.replace(rules, arrival_field=field, lateness_ms=LATENESS_S * 1000)
    counts = collections.Counter({o: 0 for o in C.OUTCOMES})
    too_late, dups, humans, kept = [], collections.Counter(), [], {}
    bot_users = set(truth["bot_user_ids"])
    for line in lines:
        try:
            e = parse_record(line, vr)
        except Rejected:
            counts[C.OUTCOME_DEAD_LETTER] += 1
            continue
        except ConsentWithdrawn:
            counts[C.OUTCOME_CONSENT_DROPPED] += 1
            continue
        except TooLate as t:
            counts[C.OUTCOME_TOO_LATE] += 1
            too_late.append(t.event["event_id"])
            continue
        if e["event_id"] in kept:
            counts[C.OUTCOME_DUPLICATE] += 1
            dups[e["event_id"]] += 1
            continue
        kept[e["event_id"]] = e
        if e["user_id"] in bot_users:
            counts[C.OUTCOME_BOT] += 1
        else:
            counts[C.OUTCOME_VALID] += 1
            humans.append(e)
    return dict(counts), too_late, dict(dups), humans


def _settle_summary(humans, lateness_s):
    """The `labels` truth recomputed with transforms.labels.settle per (user_id, item_id)."""
    label_rules = LabelRules.from_config(LabelsConfig(), lateness_s)
    groups = collections.defaultdict(list)
    for e in humans:
        if e.get("item_id") is not None:
            groups[e["user_id"], e["item_id"]].append(e)
    labels, orphans, late = [], 0, 0
    for events in groups.values():
        exposures, outcomes = split_events(events, label_rules)
        s = settle(exposures, outcomes, label_rules)
        labels += s.labels
        orphans += len(s.orphans)
        late += len(s.late_outcomes)
    positive = sorted(l["label_id"] for l in labels if l["label"])
    return {
        "exposures": len(labels),
        "positives": len(positive),
        "negatives": len(labels) - len(positive),
        "positive_label_ids": positive,
        "by_outcome": {t: sum(t in l["outcome_types"] for l in labels) for t in ("click", "add_to_cart", "purchase")},
        "orphan_outcomes": orphans,
        "late_outcomes": late,
    }


@pytest.fixture(scope="module")
def replayed(runs, rules):
    return {
        name: _replay(lines, truth, rules, FIELD if name == "arrival" else None)
        for name, (truth, lines) in runs.items()
    }


def test_generator_label_rules_are_the_pipeline_defaults():
    cfg = LabelsConfig()
    r = LabelRules.from_config(cfg, LATENESS_S)
    assert (gen.LABEL_WINDOW_MS, gen.LABEL_CLOCK_SKEW_MS, gen.LABEL_MIN_CLICK_DWELL_MS) == (
        r.window_ms,
        r.clock_skew_ms,
        r.min_click_dwell_ms,
    )
    assert gen.LABEL_OUTCOME_TYPES == r.outcome_types
    assert gen.LABEL_POSITIVE == dict(r.positive_weights) and gen.LABEL_NEGATIVE == dict(r.negative_weights)
    assert set(gen.BY_OUTCOME) == set(cfg.positive)
    assert gen.DEFAULT_LATENESS_S == 3600


@pytest.mark.parametrize("name", ["plain", "arrival"])
def test_counts_and_too_late_match_the_parse_rules(runs, replayed, name):
    truth, lines = runs[name]
    counts, too_late, dups, _ = replayed[name]
    assert truth["input_records"] == len(lines) == N == sum(truth["counts"].values())
    assert counts == truth["counts"]
    assert sorted(too_late) == truth["too_late_event_ids"]
    assert dups == truth["duplicate_event_ids"]
    assert truth["lateness_s"] == LATENESS_S
    if name == "plain":
        assert truth["arrival_field"] is None
        assert truth["counts"][C.OUTCOME_TOO_LATE] == 0 and truth["too_late_event_ids"] == []
        assert truth["labels"]["late_outcomes"] == 0
    else:
        assert truth["arrival_field"] == FIELD
        # ~1% of events arrive over an hour late (60-90 min of the 2-90 min ones, and the 3-12 h ones)
        assert 0.004 * N < truth["counts"][C.OUTCOME_TOO_LATE] < 0.02 * N
        late = {e for e, s in truth["late_event_ids"].items() if s > LATENESS_S}
        assert set(truth["too_late_event_ids"]) >= late - set(truth["consent_dropped_event_ids"])


def test_envelope_is_the_only_difference(runs):
    (_, plain), (truth, stamped) = runs["plain"], runs["arrival"]
    prefix = b'{"' + FIELD.encode() + b'":'
    last, bare = 0, 0
    for p, s in zip(plain, stamped):
        if s.startswith(prefix):
            head, rest = s[len(prefix) :].split(b",", 1)
            arrival = int(head)
            assert arrival >= last, "records are not in arrival order"
            last = arrival
            assert b"{" + rest == p
        else:  # only malformed JSON and non-objects go unstamped
            bare += 1
            assert s == p
            try:
                assert not isinstance(orjson.loads(s), dict)
            except orjson.JSONDecodeError:
                pass
    assert (
        bare == truth["dead_letter_by_reason"][C.MALFORMED_JSON] + truth["dead_letter_by_reason"][C.NOT_AN_OBJECT] > 0
    )


def _check_copies(lines, truth, rules):
    """Copies arrive strictly later; once the first copy is too late every copy is. Returns how many
    events have an on-time first copy and a too-late later copy (too_late, not duplicates)."""
    vr = dataclasses.replace(rules, arrival_field=FIELD, lateness_ms=LATENESS_S * 1000)
    copies = collections.defaultdict(list)
    for line in lines:
        try:
            e = parse_record(line, vr)
            copies[e["event_id"]].append((e["arrival_time"], False))
        except TooLate as t:
            copies[t.event["event_id"]].append((t.event["arrival_time"], True))
        except (Rejected, ConsentWithdrawn):
            pass
    repeated = {k: v for k, v in copies.items() if len(v) > 1}
    assert len(repeated) > 100
    mixed = 0
    for eid, cs in repeated.items():
        assert all(a[0] < b[0] for a, b in zip(cs, cs[1:])), eid
        if cs[0][1]:
            assert all(late for _, late in cs), eid
            assert eid not in truth["duplicate_event_ids"]
        else:
            n_late = sum(late for _, late in cs)
            mixed += n_late > 0
            assert truth["duplicate_event_ids"].get(eid, 0) == len(cs) - 1 - n_late, eid
    return mixed


def test_copies_arrive_later_and_first_too_late_means_all(runs, rules, tmp_path):
    truth, lines = runs["arrival"]
    _check_copies(lines, truth, rules)
    # many retries and late arrivals: some events have an on-time first copy and a too-late retry
    path = tmp_path / "retries.jsonl"
    truth = gen.generate(6000, path, seed=2, arrival_field=FIELD, duplicate_fraction=0.8, late_fraction=0.5)
    lines = _lines(path)
    assert _check_copies(lines, truth, rules) > 0
    counts, too_late, dups, _ = _replay(lines, truth, rules, FIELD)
    assert counts == truth["counts"] and sorted(too_late) == truth["too_late_event_ids"]
    assert dups == truth["duplicate_event_ids"]


@pytest.mark.parametrize("name", ["plain", "arrival"])
def test_label_truth_equals_settle(runs, replayed, name):
    truth = runs[name][0]
    humans = replayed[name][3]
    assert _settle_summary(humans, LATENESS_S) == truth["labels"]
    assert truth["labels"]["exposures"] == truth["valid_event_count_by_type"]["impression"]


@pytest.mark.parametrize("name", ["plain", "arrival"])
def test_intended_labels_agree_but_for_the_counted_ambiguities(runs, replayed, name):
    truth = runs[name][0]
    rule, intent = truth["labels"], truth["labels_intended"]
    amb = intent["ambiguous"]
    assert set(amb) == set(gen.AMBIGUOUS_KINDS) and amb["other"] == 0
    assert intent["exposures"] == rule["exposures"]
    differing = set(intent["ambiguous_label_ids"])
    assert set(rule["positive_label_ids"]) ^ set(intent["positive_label_ids"]) <= differing
    for k in gen.BY_OUTCOME:
        assert abs(rule["by_outcome"][k] - intent["by_outcome"][k]) <= len(differing)
    assert rule["orphan_outcomes"] == (
        intent["orphan_outcomes"] + amb["outcome_beyond_window"] - amb["attributed_to_other_exposure"]
    )
    assert abs(rule["late_outcomes"] - intent["late_outcomes"]) <= sum(amb.values())
    assert sum(intent["orphans_by_cause"].values()) == intent["orphan_outcomes"]
    # the ambiguous cases are rare
    outcomes = sum(1 for e in replayed[name][3] if e["event_type"] in gen.LABEL_OUTCOME_TYPES and e.get("item_id"))
    assert sum(amb.values()) <= 0.01 * outcomes and len(differing) <= sum(amb.values())


def test_orphans_and_late_outcomes_are_there(runs, replayed):
    plain, stamped = runs["plain"][0], runs["arrival"][0]
    outcomes = sum(1 for e in replayed["plain"][3] if e["event_type"] in gen.LABEL_OUTCOME_TYPES and e.get("item_id"))
    lost = plain["labels_intended"]["orphans_by_cause"][gen.CAUSE_LOST]
    assert 0.001 * outcomes < lost < 0.015 * outcomes  # ~0.5% deliberately orphaned
    assert plain["labels_intended"]["orphans_by_cause"][gen.CAUSE_DEAD_LETTER] > 0
    assert plain["labels_intended"]["orphans_by_cause"][gen.CAUSE_TOO_LATE] == 0
    assert stamped["labels_intended"]["orphans_by_cause"][gen.CAUSE_TOO_LATE] > 0
    assert stamped["labels"]["late_outcomes"] > 0 and stamped["labels"]["orphan_outcomes"] > 0
    assert 0 < plain["labels"]["positives"] < plain["labels"]["exposures"]
    # same events: the arrival field only moves too-late impressions out of the exposures
    assert plain["labels"]["exposures"] - stamped["labels"]["exposures"] == (
        plain["valid_event_count_by_type"]["impression"] - stamped["valid_event_count_by_type"]["impression"]
    )


def test_avro_ignores_the_arrival_field(tmp_path):
    import fastavro

    path = tmp_path / "events.avro"
    truth = gen.generate(2000, path, seed=5, arrival_field=FIELD)
    with open(path, "rb") as f:
        records = list(fastavro.reader(f))
    assert len(records) == 2000 and all(FIELD not in r for r in records)
    assert truth["arrival_field"] is None and truth["counts"][C.OUTCOME_TOO_LATE] == 0
    assert truth["labels"]["late_outcomes"] == 0


def test_bad_arrival_field_and_lateness(tmp_path):
    for bad in ("", "event_time", "user_id", 5):
        with pytest.raises(ValueError):
            gen.generate(10, tmp_path / "x.jsonl", arrival_field=bad)
    for bad in (0, -1, "1h", True):
        with pytest.raises(ValueError):
            gen.generate(10, tmp_path / "x.jsonl", lateness_s=bad)
