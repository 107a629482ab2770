import json
from pathlib import Path

import pytest

from transforms import contract
from transforms.bots import BotRules, CrawlerMatcher, judge_run, superhuman_clicks, sustained_rate

RULES = BotRules(True, (), 600.0, 120, 2, 200, 3)
T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z


def ev(t, etype="view", item=None, request=None, n=[0]):
    n[0] += 1
    return {"event_id": f"e{n[0]}", "event_type": etype, "event_time": t, "item_id": item, "request_id": request}


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
    events = [ev(T0, "impression", "i1", "r1"), ev(T0 + 1500, "click", "i1", "r1"),
              ev(T0 + 10_000, "click", "i2", None), ev(T0 + 10_050, "impression", "i2", "r2")]
    assert superhuman_clicks(events, 200) == (0, None)
    assert judge_run(events, RULES) is None
