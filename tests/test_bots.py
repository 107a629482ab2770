import itertools
import json
from pathlib import Path

import pytest

from transforms import contract
from transforms.bots import BotRules, CrawlerMatcher, judge_run, machine_cadence, superhuman_clicks, sustained_rate

RULES = BotRules(True, (), 600.0, 120, 2, 200, 3)
T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z


_EVENT_IDS = itertools.count(1)


def ev(t, etype="view", item=None, request=None):
    return {
        "event_id": f"e{next(_EVENT_IDS)}",
        "event_type": etype,
        "event_time": t,
        "item_id": item,
        "request_id": request,
    }


def real_browser_agents():
    import fake_useragent

    path = Path(fake_useragent.__file__).parent / "data" / "browsers.jsonl"
    return [json.loads(line)["useragent"] for line in path.read_text().splitlines()]


def test_crawler_false_positives_on_real_browsers_under_budget():
    agents = real_browser_agents()
    matcher = CrawlerMatcher()
    flagged = [ua for ua in agents if matcher.match(ua)]
    rate = len(flagged) / len(agents)
    print(f"crawler false-positive rate on {len(agents)} real browser UAs: {rate:.4%}")
    assert rate < 0.005, flagged[:10]


def test_crawler_recall_on_known_crawler_instances():
    import crawleruseragents

    instances = [i for d in crawleruseragents.CRAWLER_USER_AGENTS_DATA for i in d.get("instances", [])]
    matcher = CrawlerMatcher()
    recall = sum(bool(matcher.match(ua)) for ua in instances) / len(instances)
    print(f"crawler recall on {len(instances)} known crawler UAs: {recall:.2%}")
    assert recall > 0.99


def test_extra_patterns():
    assert CrawlerMatcher(False, ("InternalProbe/",)).match("InternalProbe/1.2") == "InternalProbe/"
    assert CrawlerMatcher(False, ()).match("Googlebot/2.1") is None


def test_human_bursts_are_not_sustained_rate():
    # 30 events in a minute, 10 of them within one second, repeated every few minutes.
    times = []
    for burst in range(10):
        start = T0 + burst * 180_000
        times += [start + i * 100 for i in range(10)] + [start + 2_000 + i * 2_000 for i in range(20)]
    assert sustained_rate(times, 120, 2) is None


def test_five_per_second_for_minutes_is_sustained_rate():
    times = [T0 + 30_000 + i * 200 for i in range(5 * 60 * 3)]  # 3 minutes at 5/s, starting mid-minute
    detail = sustained_rate(times, 120, 2)
    assert detail and "consecutive minutes" in detail


def test_two_separate_busy_minutes_are_not_sustained():
    times = [T0 + i * 200 for i in range(300)] + [T0 + 300_000 + i * 200 for i in range(300)]
    assert sustained_rate(times, 120, 2) is None


def test_superhuman_clicks_matched_by_request_and_item():
    events = []
    for k in range(4):
        t = T0 + k * 60_000
        events += [ev(t, "impression", f"i{k}", f"r{k}"), ev(t + 50, "click", f"i{k}", f"r{k}")]
    assert superhuman_clicks(events, 200) == (4, 50)
    assert judge_run(events, RULES)[0] == contract.BOT_RULE_SUPERHUMAN_CLICKS


def test_human_click_latency_is_fine_and_click_before_impression_ignored():
    events = [
        ev(T0, "impression", "i1", "r1"),
        ev(T0 + 1500, "click", "i1", "r1"),
        ev(T0 + 10_000, "click", "i2", None),
        ev(T0 + 10_050, "impression", "i2", "r2"),
    ]
    assert superhuman_clicks(events, 200) == (0, None)
    assert judge_run(events, RULES) is None


# --- machine cadence, continuous runs, huge users ---------------------------------------------------


def test_steady_one_per_second_is_machine_cadence():
    import random

    rng = random.Random(1)
    t, times = T0 + 17_345, []
    for _ in range(240):  # 4 minutes at ~1/s, 3% timing jitter
        times.append(int(t))
        t += 1000 * (1 + rng.gauss(0, 0.03))
    detail = machine_cadence(times, 0.2, 60, 0.5, 120_000)
    assert detail and "near-constant" in detail
    run = [ev(x, "view", "i1") for x in times]
    assert judge_run(run, RULES)[0] == contract.BOT_RULE_MACHINE_CADENCE


def test_human_bursts_are_not_machine_cadence():
    # 30 events a minute, bursts of 10 in a second, irregular pauses: over 10 minutes.
    import random

    rng = random.Random(2)
    times, t = [], T0
    while t < T0 + 600_000:
        times += [t + i * rng.randint(50, 150) for i in range(10)]
        t += rng.randint(3_000, 40_000)
    assert machine_cadence(times, 0.2, 60, 0.5, 120_000) is None


def test_cadence_needs_rate_duration_and_count():
    steady = [T0 + i * 1000 for i in range(100)]
    assert machine_cadence(steady, 0.2, 60, 0.5, 120_000) is None  # 99 s < 2 min
    slow = [T0 + i * 3000 for i in range(100)]
    assert machine_cadence(slow, 0.2, 60, 0.5, 120_000) is None  # 0.33/s
    assert machine_cadence(steady[:50], 0.2, 60, 0.5, 10_000) is None  # 50 < 60 events


def test_sustained_rate_minutes_count_from_the_run_not_the_clock():
    times = [T0 + 30_000 + i * 200 for i in range(5 * 60 * 3)]
    for shift in (0, 1, 29_999, 30_000, 59_999):
        assert sustained_rate([t + shift for t in times], 120, 2) == sustained_rate(times, 120, 2)


def test_split_runs_by_gap_and_cap_from_run_start():
    from transforms.sessions import split_runs

    events = [ev(T0 + m * 60_000, "view") for m in (0, 5, 10, 50, 55, 100, 101)]
    assert [len(r) for r in split_runs(events, 30 * 60_000, 7200_000)] == [3, 2, 2]
    assert [len(r) for r in split_runs(events, 30 * 60_000, 50 * 60_000)] == [3, 2, 2]
    assert [len(r) for r in split_runs(events, 60 * 60_000, 50 * 60_000)] == [3, 2, 2]  # by the cap alone
    # the cap counts from each run's first event, not from a clock grid
    assert [len(r) for r in split_runs(events, 60 * 60_000, 10 * 60_000)] == [2, 1, 2, 2]


def test_huge_user_is_judged_by_volume_without_sorting(monkeypatch):
    import apache_beam as beam

    from transforms.bots import FilterBots, _UserRunsBatchFn

    rules = BotRules(True, (), 600.0, 120, 2, 200, 3, max_user_events=1000)
    fn = _UserRunsBatchFn(rules, 1800.0)
    events = [{**ev(T0 + i * 30_000, "view"), "user_id": "u1"} for i in range(1001)]  # human pace, too many
    monkeypatch.setattr("builtins.sorted", lambda *a, **k: pytest.fail("a huge user must not be sorted"))
    out = list(fn.process(("u1", [events[:400], events[400:]])))  # the lists of two bundles
    monkeypatch.undo()
    assert len(out) == 1001 and all(isinstance(o, beam.pvalue.TaggedOutput) and o.tag == FilterBots.BOTS for o in out)
    assert {o.value["bot_rule"] for o in out} == {contract.BOT_RULE_SUSTAINED_RATE}
    assert "judged by volume" in out[0].value["bot_detail"]
    # at the bound it is judged normally
    out = list(fn.process(("u1", [events[:1000]])))
    assert not any(isinstance(o, beam.pvalue.TaggedOutput) for o in out)


@pytest.mark.parametrize("max_events", [1, 4, 50_000])
def test_user_lists_split_over_flushes_judge_as_one_group(max_events):
    """Bounded FilterBots: crawler-flagged events leave at once; the rest reach the per-user judge as
    lists gathered per bundle. However the lists are cut (flushed every `max_events`, or one per
    bundle), a user's events are judged exactly as one whole group."""
    import apache_beam as beam

    from transforms.bots import FilterBots, _CrawlersAndUserListsFn, _UserRunsBatchFn
    from transforms.records import RecordPacker

    crawler_ua = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    browser_ua = "Mozilla/5.0 (X11; Linux x86_64; rv:137.0) Gecko/20100101 Firefox/137.0"
    events = []
    for i in range(400):  # u1: 240 events a minute for 100 s; u2: human pace; u3: a crawler user agent
        events.append({**ev(T0 + i * 250, "view"), "user_id": "u1", "user_agent": browser_ua})
        if i % 10 == 0:
            events.append({**ev(T0 + i * 4_500, "view"), "user_id": "u2", "user_agent": browser_ua})
        if i % 100 == 0:
            events.append({**ev(T0 + i * 1000, "view"), "user_id": "u3", "user_agent": crawler_ua})
    packer = RecordPacker()
    fn = _CrawlersAndUserListsFn(RULES, packer, max_events=max_events)
    fn.setup()
    fn.start_bundle()
    out = [o for e in events for o in fn.process(e)] + [wv.value for wv in fn.finish_bundle()]
    crawlers = [o.value for o in out if isinstance(o, beam.pvalue.TaggedOutput)]
    assert [c["user_id"] for c in crawlers] == ["u3"] * 4
    assert {c["bot_rule"] for c in crawlers} == {contract.BOT_RULE_CRAWLER_UA}
    lists = {}
    for user, packed in (o for o in out if not isinstance(o, beam.pvalue.TaggedOutput)):
        lists.setdefault(user, []).append(packed)
    assert sorted(lists) == ["u1", "u2"]
    assert (max(map(len, lists.values())) > 1) == (max_events < 440)

    def judged(user, user_lists):
        judge = _UserRunsBatchFn(RULES, 1800.0, packer)
        return sorted(
            (getattr(o, "tag", None), json.dumps(getattr(o, "value", o), sort_keys=True))
            for o in judge.process((user, user_lists))
        )

    for user, user_lists in lists.items():
        whole = [[p for packed in user_lists for p in packed]]
        assert judged(user, user_lists) == judged(user, whole)
    assert {tag for tag, _ in judged("u1", lists["u1"])} == {FilterBots.BOTS}
    assert {tag for tag, _ in judged("u2", lists["u2"])} == {None}


def test_user_lists_take_packed_events_as_they_take_dicts():
    """Bounded FilterBots after DedupeEvents(emit_packed=True): packed events are routed (crawler check,
    user key) from two of their fields and go on as they came; the outputs are those of the same
    events as dicts, and a crawler-flagged one leaves as a dict."""
    import apache_beam as beam

    from transforms.bots import _CrawlersAndUserListsFn
    from transforms.records import RecordPacker

    order = ("event_id", "event_type", "event_time", "item_id", "request_id", "user_id", "user_agent")
    packer = RecordPacker(order)
    crawler_ua = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
    events = [{**ev(T0 + i * 1000, "view"), "user_id": f"u{i % 3}", "user_agent": "Mozilla/5.0"} for i in range(9)]
    events[4]["user_agent"] = crawler_ua
    events.append({"event_id": "short", "event_type": "view", "event_time": T0, "user_id": "u9"})  # no agent
    events.append({"event_id": "no-user", "event_type": "view", "event_time": T0, "user_agent": crawler_ua})

    def run(inputs):
        fn = _CrawlersAndUserListsFn(RULES, packer)
        fn.setup()
        fn.start_bundle()
        return [o for e in inputs for o in fn.process(e)] + [wv.value for wv in fn.finish_bundle()]

    def readable(outputs):
        return [
            (o.tag, o.value) if isinstance(o, beam.pvalue.TaggedOutput) else (o[0], [packer.unpack(p) for p in o[1]])
            for o in outputs
        ]

    packed_in = [packer.pack(e) for e in events]
    as_packed = run(packed_in)
    assert readable(as_packed) == readable(run(events))
    bots = [o for o in as_packed if isinstance(o, beam.pvalue.TaggedOutput)]
    assert [b.value["event_id"] for b in bots] == [events[4]["event_id"], "no-user"]
    assert all(isinstance(b.value, dict) for b in bots)
    routed = [p for o in as_packed if not isinstance(o, beam.pvalue.TaggedOutput) for p in o[1]]
    assert sorted(map(id, routed)) == sorted(id(p) for i, p in enumerate(packed_in[:-1]) if i != 4)  # as they came
