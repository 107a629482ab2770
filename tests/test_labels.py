"""Pure label logic: attribution, label rules, settlement (batch and streaming share it), sessions."""

import pytest

from transforms.labels import LabelRules, attribute, make_label, make_slate, settle
from transforms.sessions import assign_sessions, session_id_for, split_by_bucket, split_by_gap

M = 60_000
RULES = LabelRules(
    window_ms=30 * M,
    lateness_ms=60 * M,
    clock_skew_ms=5_000,
    positive_weights=(("purchase", 5.0), ("add_to_cart", 3.0), ("click", 1.0)),
    negative_weights=(("skip", 1.0),),
    default_negative_weight=1.0,
    min_click_dwell_ms=0,
    outcome_types=frozenset({"click", "view", "dwell", "add_to_cart", "purchase", "skip"}),
)


def ev(eid, etype, t, request=None, item="i1", arrival=None, **kw):
    return {
        "event_id": eid,
        "event_type": etype,
        "event_time": t,
        "user_id": "u",
        "item_id": item,
        "request_id": request,
        "arrival_time": arrival,
        **kw,
    }


def test_request_id_joins_its_own_exposure_even_if_another_is_later():
    x1, x2 = ev("x1", "impression", 0, "r1"), ev("x2", "impression", 5 * M, "r2")
    assert attribute([x1, x2], [ev("c", "click", 6 * M, "r1")], RULES) == {"c": "x1"}


def test_without_request_id_the_latest_exposure_before_wins():
    x1, x2 = ev("x1", "impression", 0, "r1"), ev("x2", "impression", 5 * M, "r2")
    assert attribute([x1, x2], [ev("c", "click", 6 * M)], RULES) == {"c": "x2"}
    assert attribute([x1, x2], [ev("c", "click", 40 * M)], RULES) == {"c": None}  # outside the window


def test_clock_skew_tolerance_for_same_request():
    x = ev("x", "impression", 10_000, "r1")
    assert attribute([x], [ev("c", "click", 6_000, "r1")], RULES) == {"c": "x"}
    assert attribute([x], [ev("c", "click", 4_000, "r1")], RULES) == {"c": None}


def test_label_weights_and_min_dwell():
    x = ev("x", "impression", 0, "r1", position=2, propensity=0.4)
    assert (make_label(x, [ev("a", "add_to_cart", M), ev("c", "click", M)], RULES)["weight"]) == 3.0
    assert make_label(x, [ev("s", "skip", M)], RULES)["label"] == 0
    strict = LabelRules(**{**RULES.__dict__, "min_click_dwell_ms": 5000})
    assert make_label(x, [ev("c", "click", M, dwell_ms=1000)], strict)["label"] == 0
    assert make_label(x, [ev("c", "click", M, dwell_ms=9000)], strict)["label"] == 1
    label = make_label(x, [], RULES)
    assert (label["label"], label["weight"], label["label_time"]) == (0, 1.0, 60 * M)


def test_settle_is_incremental_and_emits_each_label_once():
    x = ev("x", "impression", 0, "r1", arrival=1_000)
    on_time = ev("c", "click", M, "r1", arrival=M + 1_000)
    late = ev("a", "add_to_cart", 20 * M, "r1", arrival=70 * M)  # after the deadline (60 min)
    orphan = ev("o", "click", 0, "r9", item="i1")
    early = settle([x], [on_time, late, orphan], RULES, now=30 * M)
    assert early.labels == [] and early.orphans == []  # nothing due yet
    due = settle([x], [on_time, late, orphan], RULES, now=60 * M + 5_000)
    assert [l["label_id"] for l in due.labels] == ["x"] and due.labels[0]["outcome_types"] == ["click"]
    assert [o["event_id"] for o in due.late_outcomes] == ["a"] and [o["event_id"] for o in due.orphans] == ["o"]
    again = settle(
        [x],
        [on_time, late, orphan],
        RULES,
        now=10**13,
        emitted=frozenset({"x"}),
        reported=frozenset({"a", "o"}) | due.consumed,
    )
    assert (again.labels, again.late_outcomes, again.orphans) == ([], [], [])
    assert settle([x], [on_time, late, orphan], RULES).labels == due.labels  # batch: everything at once


def test_slate_orders_by_position():
    labels = [make_label(ev(f"x{p}", "impression", 0, "r1", item=f"i{p}", position=p), [], RULES) for p in (3, 1, 2)]
    slate = make_slate("r1", labels)
    assert [i["position"] for i in slate["items"]] == [1, 2, 3] and slate["n_items"] == 3


def test_sessions_by_gap_and_bucket():
    events = [ev(f"e{i}", "view", t) for i, t in enumerate([0, 10 * M, 50 * M, 55 * M, 70 * M])]
    runs = split_by_gap(events, 30 * M)
    assert [len(r) for r in runs] == [2, 3]
    assert [len(b) for b in split_by_bucket(events, 60 * M)] == [4, 1]
    out = assign_sessions(events[:2] + [{**events[2], "session_id": "given"}], 30 * M)
    assert out[0]["session_id"] == out[1]["session_id"] == session_id_for("u", 0) and out[2]["session_id"] == "given"


def test_repeated_outcome_ids_settle_the_same_in_any_order():
    """Copies of an outcome event_id kept apart by dedupe (over 24 h): the decision must not depend on
    the order a runner groups them in."""
    day = 86_400_000
    x = ev("x", "impression", 10 * day, request="R")
    early = ev("dup", "click", 10 * day + 2000, request="R")
    late = ev("dup", "click", 12 * day, request="R")
    settled = [settle([x], outcomes, RULES) for outcomes in ([early, late], [late, early])]
    first, second = settled
    assert first.labels == second.labels and first.late_outcomes == second.late_outcomes
    assert sorted(map(repr, first.orphans)) == sorted(map(repr, second.orphans))


@pytest.mark.parametrize("max_values", [1, 2, 50_000])
def test_slate_lists_split_over_flushes_build_the_same_slate(max_values):
    """Bounded BuildSlates: a request's labels reach the slate step as lists gathered per bundle; however
    they are cut, the slate equals make_slate over the labels. Labels without a request id make none."""
    from transforms.labels import _slate_of_packed, _SlateInputListsFn

    labels = [
        make_label(ev(f"x{r}{p}", "impression", p, f"r{r}", item=f"i{p}", position=p), [], RULES)
        for p in (3, 1, 2)
        for r in (1, 2)
    ]
    labels.append(make_label(ev("x-none", "impression", 0, None, item="i9", position=1), [], RULES))
    fn = _SlateInputListsFn(max_values)
    fn.start_bundle()
    out = [kv for label in labels for kv in fn.process(label)] + [wv.value for wv in fn.finish_bundle()]
    lists = {}
    for request, packed in out:
        lists.setdefault(request, []).append(packed)
    assert sorted(lists) == ["r1", "r2"]
    for request, request_lists in lists.items():
        expected = make_slate(request, [l for l in labels if l["request_id"] == request])
        assert _slate_of_packed(request, request_lists) == expected
