"""Bot filtering: known crawler user agents, and behaviour in event time.

Rules, in order (the first that fires names the event's `bot_rule`):
1. `crawler_user_agent` -- the user agent matches the maintained `crawler-user-agents` pattern list
   (or a configured extra pattern). Decided per event.
2. `sustained_rate` -- within one activity run of a user (events separated by less than
   `session_gap`, a Beam session window), `sustained_minutes` consecutive event-time minutes each
   with more than `max_events_per_minute` events. Real people burst (~30 a minute, ~10 in a second)
   but do not sustain machine rates for minutes.
3. `superhuman_click_latency` -- in one activity run, at least `min_superhuman_clicks` clicks that
   came less than `min_click_latency_ms` after the impression they click.
Rules 2 and 3 flag every event of the run. Flagged events go to the bots output with the rule and a
detail; they are counted and kept, never silently removed.

Runs are also cut at fixed event-time boundaries (`sessions.split_every`, default 1 h), so a
streaming job can close them: a user's bucket is judged once every event of it that is not too late
has arrived (bucket end + lateness). Batch forms the same buckets and runs, so the two agree; the
price is that a bot run crossing a boundary is judged in two parts.
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from typing import Iterable, Optional

import apache_beam as beam
import crawleruseragents
from apache_beam.metrics import Metrics
from apache_beam.transforms import window

from transforms import contract
from transforms.sessions import assign_sessions, split_by_bucket, split_by_gap

METRICS_NS = "feedback.bots"
_MINUTE_MS = 60_000


@dataclasses.dataclass(frozen=True)
class BotRules:
    crawler_user_agents: bool
    extra_crawler_patterns: tuple[str, ...]
    session_gap_s: float
    max_events_per_minute: int
    sustained_minutes: int
    min_click_latency_ms: int
    min_superhuman_clicks: int

    @classmethod
    def from_config(cls, bots_cfg) -> "BotRules":
        return cls(bots_cfg.crawler_user_agents, tuple(bots_cfg.extra_crawler_patterns), bots_cfg.session_gap,
                   bots_cfg.max_events_per_minute, bots_cfg.sustained_minutes, bots_cfg.min_click_latency_ms,
                   bots_cfg.min_superhuman_clicks)


class CrawlerMatcher:
    """Matches user agents against crawler-user-agents (case-sensitive, as the list is written)."""

    def __init__(self, use_list: bool = True, extra_patterns: Iterable[str] = ()):
        self._use_list = use_list
        self._extra = [re.compile(p) for p in extra_patterns]
        self.match = lru_cache(maxsize=100_000)(self._match)

    def _match(self, ua: Optional[str]) -> Optional[str]:
        """The pattern that matched, or None."""
        if not ua:
            return None
        for p in self._extra:
            if p.search(ua):
                return p.pattern
        if self._use_list and crawleruseragents.is_crawler(ua):
            # Only for the (rare) positives: name the first list entry that matched.
            for p in _list_patterns():
                if p.search(ua):
                    return p.pattern
            return "crawler-user-agents"
        return None


@lru_cache(maxsize=1)
def _list_patterns() -> tuple:
    # Compiled once: the list has ~1,500 patterns, more than the `re` module's own cache holds.
    return tuple(re.compile(d["pattern"]) for d in crawleruseragents.CRAWLER_USER_AGENTS_DATA)


def sustained_rate(times_ms: Iterable[int], max_per_minute: int, sustained_minutes: int) -> Optional[str]:
    """Detail text when `sustained_minutes` consecutive minutes each exceed the rate, else None."""
    per_minute: dict[int, int] = {}
    for t in times_ms:
        m = t // _MINUTE_MS
        per_minute[m] = per_minute.get(m, 0) + 1
    run, best, peak, prev = 0, 0, 0, None
    for m in sorted(per_minute):
        if per_minute[m] > max_per_minute:
            run = run + 1 if prev is not None and m == prev + 1 and run > 0 else 1
            peak = max(peak, per_minute[m])
        else:
            run = 0
        best = max(best, run)
        prev = m
    if best >= sustained_minutes:
        return f"{best} consecutive minutes above {max_per_minute} events/min (peak {peak}/min)"
    return None


def superhuman_clicks(events: Iterable[dict], min_latency_ms: int) -> tuple[int, Optional[int]]:
    """(number of clicks faster than min_latency_ms after their impression, fastest latency).

    A click's impression is the latest impression at or before it with the same request_id and
    item_id, or, when the click has no request_id, the latest impression of the same item.
    """
    by_request: dict[tuple, list[int]] = {}
    by_item: dict[str, list[int]] = {}
    clicks = []
    for e in events:
        if e["event_type"] == "impression" and e.get("item_id") is not None:
            by_request.setdefault((e.get("request_id"), e["item_id"]), []).append(e["event_time"])
            by_item.setdefault(e["item_id"], []).append(e["event_time"])
        elif e["event_type"] == "click" and e.get("item_id") is not None:
            clicks.append(e)
    fast, fastest = 0, None
    for c in clicks:
        t = c["event_time"]
        shown = by_request.get((c["request_id"], c["item_id"])) if c.get("request_id") else by_item.get(c["item_id"])
        before = [s for s in shown or () if s <= t]
        if not before:
            continue
        latency = t - max(before)
        if latency < min_latency_ms:
            fast += 1
            fastest = latency if fastest is None else min(fastest, latency)
    return fast, fastest


def judge_run(events: list[dict], rules: BotRules) -> Optional[tuple[str, str]]:
    """(rule, detail) for a user's activity run that behaves like a machine, else None."""
    detail = sustained_rate((e["event_time"] for e in events), rules.max_events_per_minute, rules.sustained_minutes)
    if detail:
        return contract.BOT_RULE_SUSTAINED_RATE, detail
    fast, fastest = superhuman_clicks(events, rules.min_click_latency_ms)
    if fast >= rules.min_superhuman_clicks:
        return (contract.BOT_RULE_SUPERHUMAN_CLICKS,
                f"{fast} clicks under {rules.min_click_latency_ms} ms after their impression (fastest {fastest} ms)")
    return None


def flag(event: dict, rule: Optional[str], detail: Optional[str]) -> dict:
    out = dict(event)
    out["bot_rule"], out["bot_detail"] = rule, detail
    return out


# --- transforms -------------------------------------------------------------------------------

class _CrawlerFn(beam.DoFn):
    def __init__(self, rules: BotRules):
        self._rules = rules
        self._flagged = Metrics.counter(METRICS_NS, contract.BOT_RULE_CRAWLER_UA)

    def setup(self):
        self._matcher = CrawlerMatcher(self._rules.crawler_user_agents, self._rules.extra_crawler_patterns)

    def process(self, event: dict):
        pattern = self._matcher.match(event.get("user_agent"))
        if pattern is None:
            yield event
        else:
            self._flagged.inc()
            yield beam.pvalue.TaggedOutput(FilterBots.BOTS, flag(
                event, contract.BOT_RULE_CRAWLER_UA, f"user agent matches crawler pattern {pattern!r}"))


class _UserActivityFn(beam.DoFn):
    """One user's events of one `split_every` bucket (streaming: one window; batch: all of the user's
    events, bucketed here the same way) -> bot verdicts per activity run, then sessions."""

    def __init__(self, rules: BotRules, session_gap_s: float, split_every_s: float, bucketed: bool):
        self._rules = rules
        self._bot_gap_ms = int(rules.session_gap_s * 1000)
        self._session_gap_ms = int(session_gap_s * 1000)
        self._split_ms = int(split_every_s * 1000)
        self._bucketed = bucketed
        self._flagged = {r: Metrics.counter(METRICS_NS, r) for r in contract.BOT_RULES}

    def process(self, keyed_events):
        _, events = keyed_events
        ordered = sorted(events, key=lambda e: (e["event_time"], e["event_id"]))
        buckets = [ordered] if self._bucketed else split_by_bucket(ordered, self._split_ms)
        for bucket in buckets:
            humans = []
            for run in split_by_gap(bucket, self._bot_gap_ms):
                verdict = judge_run(run, self._rules)
                if verdict is None:
                    humans.extend(run)
                    continue
                rule, detail = verdict
                self._flagged[rule].inc(len(run))
                for e in run:
                    yield beam.pvalue.TaggedOutput(FilterBots.BOTS, window.TimestampedValue(
                        flag(e, rule, detail), e["event_time"] / 1000.0))
            for e in assign_sessions(humans, self._session_gap_ms):
                yield window.TimestampedValue(flag(e, None, None), e["event_time"] / 1000.0)


class FilterBots(beam.PTransform):
    """Events -> human events (main, bot_rule None, session_id filled) and flagged bot events (tag
    BOTS), both in the global window with their event timestamps.

    Per-user runs are judged within fixed event-time buckets of `split_every_s`. Streaming groups each
    bucket in a fixed window over timestamps shifted by `lateness_s`, so the window closes only when
    every event of the bucket that is not too late has arrived: one complete pane, judged like batch.
    Its output is behind the watermark by up to split_every + lateness; downstream windows allow that.
    """
    BOTS = "bots"

    def __init__(self, rules: BotRules, streaming: bool = False, session_gap_s: float = 1800.0,
                 split_every_s: float = 3600.0, lateness_s: float = 3600.0):
        super().__init__()
        if rules.max_events_per_minute <= 0:
            raise ValueError("max_events_per_minute must be > 0")
        if split_every_s <= 0:
            raise ValueError("split_every_s must be > 0")
        self._rules = rules
        self._streaming = streaming
        self._session_gap_s, self._split_every_s, self._lateness_s = session_gap_s, split_every_s, lateness_s

    def expand(self, events):
        crawler = events | "CrawlerUserAgents" >> beam.ParDo(_CrawlerFn(self._rules)).with_outputs(
            self.BOTS, main="rest")
        keyed = crawler.rest | "KeyByUser" >> beam.Map(lambda e: (e["user_id"], e)).with_output_types(tuple[str, dict])
        if self._streaming:
            shift = self._lateness_s
            keyed = (keyed
                     | "ShiftByLateness" >> beam.Map(
                         lambda kv: window.TimestampedValue(kv, kv[1]["event_time"] / 1000.0 + shift))
                     | "UserBuckets" >> beam.WindowInto(
                         window.FixedWindows(self._split_every_s, offset=shift % self._split_every_s),
                         allowed_lateness=self._split_every_s))
        # Bounded input: group all of a user's events and bucket them in _UserActivityFn (same buckets).
        judged = (keyed
                  | "GroupUser" >> beam.GroupByKey()
                  | "JudgeRunsAndSessionize" >> beam.ParDo(_UserActivityFn(
                      self._rules, self._session_gap_s, self._split_every_s, bucketed=self._streaming)).with_outputs(
                      self.BOTS, main="humans"))
        humans = judged.humans | "HumansGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
        run_bots = judged[self.BOTS] | "RunBotsGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
        bots = (crawler[self.BOTS], run_bots) | "AllBots" >> beam.Flatten()
        return {"humans": humans, self.BOTS: bots}
