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

Streaming note: a run is judged when its session window closes (the watermark passes its last
event + session_gap), so bot decisions wait for the run to end; a user active without any gap of
`session_gap` holds its events until it pauses. Batch and streaming see the same runs, so they agree.
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
from apache_beam.transforms.window import TimestampCombiner

from transforms import contract

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


def split_runs(events: list[dict], gap_ms: int) -> list[list[dict]]:
    """A user's events -> activity runs, as Beam's Sessions(gap) would merge them: a run ends where
    the next event is `gap_ms` or more after the previous one."""
    runs: list[list[dict]] = []
    last = None
    for e in sorted(events, key=lambda e: (e["event_time"], e["event_id"])):
        if last is None or e["event_time"] - last >= gap_ms:
            runs.append([])
        runs[-1].append(e)
        last = e["event_time"]
    return runs


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


class _JudgeRunFn(beam.DoFn):
    """Judges the runs of one key: one run per element in streaming (session windows), or all of a
    user's events at once in batch, split into runs here exactly as the session windows would."""

    def __init__(self, rules: BotRules, split: bool):
        self._rules = rules
        self._split = split
        self._gap_ms = int(rules.session_gap_s * 1000)
        self._flagged = {r: Metrics.counter(METRICS_NS, r) for r in contract.BOT_RULES}

    def process(self, keyed_events):
        _, events = keyed_events
        runs = split_runs(list(events), self._gap_ms) if self._split else [
            sorted(events, key=lambda e: (e["event_time"], e["event_id"]))]
        for run in runs:
            yield from self._judge(run)

    def _judge(self, events):
        verdict = judge_run(events, self._rules)
        if verdict is None:
            for e in events:
                yield window.TimestampedValue(flag(e, None, None), e["event_time"] / 1000.0)
            return
        rule, detail = verdict
        self._flagged[rule].inc(len(events))
        for e in events:
            yield beam.pvalue.TaggedOutput(FilterBots.BOTS, window.TimestampedValue(
                flag(e, rule, detail), e["event_time"] / 1000.0))


class FilterBots(beam.PTransform):
    """Events -> human events (main, bot_rule None) and flagged bot events (tag BOTS), both in the
    global window with their event timestamps."""
    BOTS = "bots"

    def __init__(self, rules: BotRules, streaming: bool = False):
        super().__init__()
        if rules.max_events_per_minute <= 0:
            raise ValueError("max_events_per_minute must be > 0")
        self._rules = rules
        self._streaming = streaming

    def expand(self, events):
        crawler = events | "CrawlerUserAgents" >> beam.ParDo(_CrawlerFn(self._rules)).with_outputs(
            self.BOTS, main="rest")
        keyed = crawler.rest | "KeyByUser" >> beam.Map(lambda e: (e["user_id"], e)).with_output_types(tuple[str, dict])
        if self._streaming:
            # Earliest-timestamp output keeps the watermark held at the run's first event, so the
            # events re-emitted at their own times below are never behind it.
            keyed = keyed | "ActivityRuns" >> beam.WindowInto(
                window.Sessions(self._rules.session_gap_s), timestamp_combiner=TimestampCombiner.OUTPUT_AT_EARLIEST)
        # Bounded input: group all of a user's events and split them into runs in _JudgeRunFn, which
        # gives the same runs as session windows at a fraction of the cost of window merging.
        judged = (keyed
                  | "GroupRuns" >> beam.GroupByKey()
                  | "JudgeRuns" >> beam.ParDo(_JudgeRunFn(self._rules, split=not self._streaming)).with_outputs(
                      self.BOTS, main="humans"))
        humans = judged.humans | "HumansGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
        run_bots = judged[self.BOTS] | "RunBotsGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
        bots = (crawler[self.BOTS], run_bots) | "AllBots" >> beam.Flatten()
        return {"humans": humans, self.BOTS: bots}
