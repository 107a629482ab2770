"""Bot filtering: known crawler user agents, and behaviour in event time.

Rules, in order (the first that fires names the event's `bot_rule`):
1. `crawler_user_agent` -- the user agent matches the maintained `crawler-user-agents` pattern list
   (or a configured extra pattern). Decided per event.
2. `sustained_rate` -- within one activity run of a user, `sustained_minutes` consecutive minutes
   (counted from the run's first event) each with more than `max_events_per_minute` events. Real
   people burst (~30 a minute, ~10 in a second) but do not sustain machine rates for minutes.
3. `superhuman_click_latency` -- in one activity run, at least `min_superhuman_clicks` clicks that
   came less than `min_click_latency_ms` after the impression they click.
4. `machine_cadence` -- a run of at least `cadence_min_events` events, lasting at least
   `cadence_min_duration`, at a mean rate of at least `cadence_min_rate_per_s`, whose inter-event
   intervals are near-constant (coefficient of variation below `cadence_max_cv`): a steady crawler
   with an unknown user agent, slow enough to stay under the sustained-rate bound. People browse in
   irregular bursts (intervals from milliseconds to minutes; CV well above 1).
Rules 2-4 flag every event of the run. Flagged events go to the bots output with the rule and a
detail; they are counted and kept, never silently removed.

Runs (no fixed grid). A user's events are cut into continuous runs by inactivity only: a gap of
max(`bots.session_gap`, `sessions.gap`) or more, plus a cap of `bots.max_run_duration` counted from
the run's own first event (`sessions.split_runs`). Within a run, bot rules judge the sub-runs split
by `bots.session_gap`, and the human events get sessions by `sessions.gap`. Nothing depends on clock
time: shifting every event time by any offset gives the same decisions.
* Batch groups a user's whole input (GroupByKey) and sorts it. Bound for huge users: a user with more
  than `max_user_events` events is flagged `sustained_rate` by volume after one counting pass, without
  sorting or holding its events in a list.
* Streaming keeps a user's open run in state (global window, stateful DoFn keyed by user) and closes
  it with an event-time timer at min(last + gap, first + max_run_duration) + lateness: by then every
  event of the run that is not too late has arrived, so the run is judged whole, exactly as batch
  judges it. An open run with more than `max_user_events` events is flagged by volume at once.
  Judged events keep their event time as timestamp and are at most max_run_duration + lateness
  behind the watermark; downstream windows and label timers allow that (GraphSettings).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import statistics
from collections.abc import Iterable
from functools import lru_cache

import apache_beam as beam
import crawleruseragents
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms import contract
from transforms.labels import JoinLabels, LabelRules, settle_counters, settle_user, settlement_outputs
from transforms.records import KeyedListsFn, RecordPacker
from transforms.sessions import assign_sessions, run_closes_at, split_by_gap, split_runs

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
    cadence_max_cv: float = 0.2
    cadence_min_events: int = 60
    cadence_min_rate_per_s: float = 0.5
    cadence_min_duration_s: float = 120.0
    max_run_duration_s: float = 7200.0
    max_user_events: int = 100_000

    @classmethod
    def from_config(cls, bots_cfg) -> BotRules:
        return cls(
            bots_cfg.crawler_user_agents,
            tuple(bots_cfg.extra_crawler_patterns),
            bots_cfg.session_gap,
            bots_cfg.max_events_per_minute,
            bots_cfg.sustained_minutes,
            bots_cfg.min_click_latency_ms,
            bots_cfg.min_superhuman_clicks,
            bots_cfg.cadence_max_cv,
            bots_cfg.cadence_min_events,
            bots_cfg.cadence_min_rate_per_s,
            bots_cfg.cadence_min_duration,
            bots_cfg.max_run_duration,
            bots_cfg.max_user_events,
        )


class CrawlerMatcher:
    """Matches user agents against crawler-user-agents (case-sensitive, as the list is written)."""

    def __init__(self, use_list: bool = True, extra_patterns: Iterable[str] = ()):
        self._use_list = use_list
        self._extra = [re.compile(p) for p in extra_patterns]
        self.match = lru_cache(maxsize=100_000)(self._match)

    def _match(self, ua: str | None) -> str | None:
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


def sustained_rate(times_ms: Iterable[int], max_per_minute: int, sustained_minutes: int) -> str | None:
    """Detail text when `sustained_minutes` consecutive minutes each exceed the rate, else None.
    Minutes count from the first event (not the clock's minutes), so the verdict is shift-invariant."""
    times = list(times_ms)
    if not times:
        return None
    origin = min(times)
    per_minute: dict[int, int] = {}
    for t in times:
        m = (t - origin) // _MINUTE_MS
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


def superhuman_clicks(events: Iterable[dict], min_latency_ms: int) -> tuple[int, int | None]:
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


def machine_cadence(
    times_ms: Iterable[int], max_cv: float, min_events: int, min_rate_per_s: float, min_duration_ms: float
) -> str | None:
    """Detail text when a run's inter-event intervals are near-constant (CV < max_cv) over at least
    min_events events, min_duration_ms and min_rate_per_s, else None."""
    times = sorted(times_ms)
    if len(times) < max(3, min_events):
        return None
    span = times[-1] - times[0]
    if span < min_duration_ms or span <= 0:
        return None
    rate = (len(times) - 1) / (span / 1000.0)
    if rate < min_rate_per_s:
        return None
    intervals = [b - a for a, b in zip(times, times[1:])]
    cv = statistics.pstdev(intervals) / statistics.fmean(intervals)
    if cv >= max_cv:
        return None
    return (
        f"{len(times)} events over {span / 1000.0:.0f} s at {rate:.2f}/s with near-constant intervals "
        f"(coefficient of variation {cv:.3f} < {max_cv})"
    )


def judge_run(events: list[dict], rules: BotRules) -> tuple[str, str] | None:
    """(rule, detail) for a user's activity run that behaves like a machine, else None."""
    detail = sustained_rate((e["event_time"] for e in events), rules.max_events_per_minute, rules.sustained_minutes)
    if detail:
        return contract.BOT_RULE_SUSTAINED_RATE, detail
    fast, fastest = superhuman_clicks(events, rules.min_click_latency_ms)
    if fast >= rules.min_superhuman_clicks:
        return (
            contract.BOT_RULE_SUPERHUMAN_CLICKS,
            f"{fast} clicks under {rules.min_click_latency_ms} ms after their impression (fastest {fastest} ms)",
        )
    detail = machine_cadence(
        (e["event_time"] for e in events),
        rules.cadence_max_cv,
        rules.cadence_min_events,
        rules.cadence_min_rate_per_s,
        rules.cadence_min_duration_s * 1000,
    )
    if detail:
        return contract.BOT_RULE_MACHINE_CADENCE, detail
    return None


def volume_detail(n_events: int, rules: BotRules, where: str) -> str:
    return f"{n_events} events {where}, more than bots.max_user_events={rules.max_user_events}: judged by volume"


def _order(e: dict):
    return e["event_time"], e["event_id"]


def judge_unit(unit: list[dict], rules: BotRules, session_gap_ms: int):
    """A closed run of one user (time-ordered) -> [(rule or None, detail or None, event)]: bot sub-runs
    (split by the bot gap) flagged whole, the human events with sessions assigned."""
    out, humans = [], []
    for run in split_by_gap(unit, int(rules.session_gap_s * 1000)):
        verdict = judge_run(run, rules)
        if verdict is None:
            humans.extend(run)
        else:
            out.extend((verdict[0], verdict[1], e) for e in run)
    out.extend((None, None, e) for e in assign_sessions(humans, session_gap_ms))
    return out


def flag(event: dict, rule: str | None, detail: str | None) -> dict:
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
            yield self._flag_crawler(event, pattern)

    def _flag_crawler(self, event: dict, pattern: str):
        self._flagged.inc()
        return beam.pvalue.TaggedOutput(
            FilterBots.BOTS,
            flag(event, contract.BOT_RULE_CRAWLER_UA, f"user agent matches crawler pattern {pattern!r}"),
        )


class _JudgeFn(beam.DoFn):
    """Shared by the batch and streaming DoFns: closed runs -> tagged outputs. Streaming stamps each with
    its event time for the windows downstream; the bounded graph has none, and a TimestampedValue costs
    a window assignment per element there for nothing."""

    STAMP_EVENT_TIME = False

    def __init__(self, rules: BotRules, session_gap_s: float):
        self._rules = rules
        self._session_gap_ms = int(session_gap_s * 1000)
        self._unit_gap_ms = int(max(rules.session_gap_s, session_gap_s) * 1000)
        self._cap_ms = int(rules.max_run_duration_s * 1000)
        self._flagged = {r: Metrics.counter(METRICS_NS, r) for r in contract.BOT_RULES}
        self._by_volume = Metrics.counter(METRICS_NS, "judged_by_volume")

    def _emit(self, judged):
        for rule, detail, e in judged:
            out = flag(e, rule, detail)
            if self.STAMP_EVENT_TIME:
                out = window.TimestampedValue(out, e["event_time"] / 1000.0)
            if rule is None:
                yield out
            else:
                self._flagged[rule].inc()
                yield beam.pvalue.TaggedOutput(FilterBots.BOTS, out)

    def _judge_units(self, units):
        for unit in units:
            yield from self._emit(judge_unit(unit, self._rules, self._session_gap_ms))

    def _judge_by_volume(self, events: Iterable[dict], n: int, where: str):
        self._by_volume.inc()
        detail = volume_detail(n, self._rules, where)
        return self._emit((contract.BOT_RULE_SUSTAINED_RATE, detail, e) for e in events)


class _Chained:
    """Lists read as one iterable, on every pass (a user's event lists from the GroupByKey)."""

    __slots__ = ("_lists",)

    def __init__(self, lists: Iterable[list]):
        self._lists = lists

    def __iter__(self):
        return itertools.chain.from_iterable(self._lists)


class _CrawlersAndUserListsFn(_CrawlerFn, KeyedListsFn):
    """Bounded input: events (dicts, or bytes packed by `packer`: DedupeEvents(emit_packed=True)) ->
    crawler-flagged events (tag BOTS, dicts, as _CrawlerFn) and, for the rest, (user, [packed events])
    lists gathered per bundle (KeyedListsFn) for the per-user GroupByKey. A packed event is read for
    its user and user agent (unpacked, but no dict is built) and goes on as the bytes it came as. A
    user's runs are sorted before they are judged, so the lists' order does not matter."""

    def __init__(self, rules: BotRules, packer: RecordPacker, max_events: int = 10_000):
        _CrawlerFn.__init__(self, rules)
        KeyedListsFn.__init__(self, max_events)
        self._packer = packer
        self._user_and_agent = packer.reader("user_id", "user_agent")

    def process(self, event):
        if type(event) is bytes:
            packed, (user, agent) = event, self._user_and_agent(event)
        else:
            packed, user, agent = None, None, event.get("user_agent")
        pattern = self._matcher.match(agent)
        if pattern is not None:
            yield self._flag_crawler(event if packed is None else self._packer.unpack(packed), pattern)
            return
        if packed is None:
            user, packed = event["user_id"], self._packer.pack(event)
        yield from self._add(user, packed)


class _UserRunsBatchFn(_JudgeFn):
    """(user, lists of all of the user's events) -> runs judged whole (GroupByKey over the bounded
    input, _CrawlersAndUserListsFn's lists). `packer`: the events come packed by it; None: as dicts.
    `labels`: also settle the labels of the user's human events (JoinLabels' outputs, labels under
    contract.TAG_LABELS)."""

    def __init__(
        self,
        rules: BotRules,
        session_gap_s: float,
        packer: RecordPacker | None = None,
        labels: LabelRules | None = None,
    ):
        super().__init__(rules, session_gap_s)
        self._packer = packer
        self._labels = labels
        self._label_counters = settle_counters() if labels is not None else None

    def process(self, keyed_events):
        _, event_lists = keyed_events
        # Counting pass: a huge user is never sorted or listed (nor unpacked).
        n = sum(map(len, event_lists))
        events = _Chained(event_lists)
        if self._packer is not None:
            events = self._packer.unpacked(events)
        if n > self._rules.max_user_events:
            yield from self._judge_by_volume(events, n, "of one user in the input")
            return
        ordered = sorted(events, key=_order)
        judged = self._judge_units(split_runs(ordered, self._unit_gap_ms, self._cap_ms))
        if self._labels is None:
            yield from judged
            return
        humans = []
        for out in judged:
            if not isinstance(out, beam.pvalue.TaggedOutput):
                humans.append(out)
            yield out
        for settlement in settle_user(humans, self._labels):
            yield from settlement_outputs(settlement, self._label_counters, labels_tag=contract.TAG_LABELS)


class _UserRunsStreamingFn(_JudgeFn):
    """(user, event) -> runs judged whole once closed. The user's open events wait in state; an
    event-time timer fires at min(first + max_run_duration, last + gap) + lateness of the earliest
    open run. State and timer names carry a `bots_` prefix (timer names must be unique per pipeline)."""

    STAMP_EVENT_TIME = True

    EVENTS = BagStateSpec("bots_open_events", PickleCoder())
    SPAN = ReadModifyWriteStateSpec("bots_open_span", PickleCoder())  # (min time, max time, count)
    CLOSE = TimerSpec("bots_run_close", TimeDomain.WATERMARK)

    def __init__(self, rules: BotRules, session_gap_s: float, lateness_s: float):
        super().__init__(rules, session_gap_s)
        self._lateness_ms = int(lateness_s * 1000)

    def _close_at(self, lo: int, hi: int) -> int:
        return run_closes_at(lo, hi, self._unit_gap_ms, self._cap_ms) + self._lateness_ms

    def process(
        self,
        keyed,
        events=beam.DoFn.StateParam(EVENTS),
        span=beam.DoFn.StateParam(SPAN),
        close=beam.DoFn.TimerParam(CLOSE),
    ):
        _, e = keyed
        t = e["event_time"]
        lo, hi, n = span.read() or (t, t, 0)
        lo, hi, n = min(lo, t), max(hi, t), n + 1
        events.add(e)
        if n > self._rules.max_user_events:
            buffered = list(events.read())
            events.clear()
            span.clear()
            yield from self._judge_by_volume(buffered, n, "in one open run of one user")
            return
        span.write((lo, hi, n))
        # Also moves the timer earlier when an out-of-order event lowers the run's first time.
        close.set(Timestamp(micros=self._close_at(lo, hi) * 1000))

    @on_timer(CLOSE)
    def _on_close(
        self,
        fire=beam.DoFn.TimestampParam,
        events=beam.DoFn.StateParam(EVENTS),
        span=beam.DoFn.StateParam(SPAN),
        close=beam.DoFn.TimerParam(CLOSE),
    ):
        horizon = fire.micros // 1000 - self._lateness_ms  # every not-too-late event before this has arrived
        ordered = sorted(events.read(), key=_order)
        if not ordered:
            return
        units = split_runs(ordered, self._unit_gap_ms, self._cap_ms)
        done = 0
        for unit in units:
            if run_closes_at(unit[0]["event_time"], unit[-1]["event_time"], self._unit_gap_ms, self._cap_ms) > horizon:
                break  # still open; so is every later run
            done += 1
        yield from self._judge_units(units[:done])
        events.clear()
        rest = [e for unit in units[done:] for e in unit]
        if not rest:
            span.clear()
            return
        for e in rest:
            events.add(e)
        lo, hi = rest[0]["event_time"], rest[-1]["event_time"]
        span.write((lo, hi, len(rest)))
        close.set(Timestamp(micros=self._close_at(lo, hi) * 1000))


class FilterBots(beam.PTransform):
    """Bounded events (global window) -> human events (main, bot_rule None, session_id filled) and
    flagged bot events (tag BOTS), both in the global window. The input events are dicts, or bytes
    packed by `packer` (DedupeEvents(emit_packed=True) in the bounded graph); the outputs dicts.

    Per-user runs are continuous (inactivity gap, plus the max_run_duration cap counted from each
    run's first event); see the module docstring. This class groups each user's whole input;
    FilterBotsStreaming keeps open runs in state instead, with the same decisions.

    Args:
      rules: the bot rules (BotRules.from_config).
      session_gap_s: `sessions.gap`, for session ids and run boundaries.
      packer: packs the events through the per-user GroupByKey (RecordPacker); default: every event as
        a whole dict.
      labels: also settle labels in the same per-user groups (a (user, item) key belongs to one user,
        so this spares JoinLabels' own shuffle): the outputs then include JoinLabels' (labels under
        contract.TAG_LABELS, JoinLabels.ORPHANS, JoinLabels.LATE_OUTCOMES), with the same decisions.
    """

    BOTS = "bots"

    def __init__(
        self,
        rules: BotRules,
        session_gap_s: float = 1800.0,
        packer: RecordPacker | None = None,
        labels: LabelRules | None = None,
    ):
        super().__init__()
        self._packer = packer or RecordPacker()
        self._labels = labels
        if rules.max_events_per_minute <= 0:
            raise ValueError("max_events_per_minute must be > 0")
        if rules.max_run_duration_s < max(rules.session_gap_s, session_gap_s):
            raise ValueError("max_run_duration must be at least the bot and session gaps")
        self._rules = rules
        self._session_gap_s = session_gap_s

    @staticmethod
    def output_delay_s(rules: BotRules, lateness_s: float) -> float:
        """How far behind the watermark judged events can be in streaming."""
        return rules.max_run_duration_s + lateness_s

    def _output_tags(self) -> tuple:
        if self._labels is None:
            return (self.BOTS,)
        return self.BOTS, contract.TAG_LABELS, JoinLabels.ORPHANS, JoinLabels.LATE_OUTCOMES

    def _judge(self, keyed):
        fn = _UserRunsBatchFn(self._rules, self._session_gap_s, self._packer, self._labels)
        return (
            keyed
            | "GroupUser" >> beam.GroupByKey()
            | "JudgeRunsAndSessionize" >> beam.ParDo(fn).with_outputs(*self._output_tags(), main=contract.TAG_HUMANS)
        )

    def _crawlers_and_keyed(self, events):
        """(crawler-flagged events, the rest keyed by user): per-user lists in the bounded graph."""
        KeyedListsFn.require_global_window(events, "FilterBots")
        split = events | "CrawlersAndUserLists" >> beam.ParDo(
            _CrawlersAndUserListsFn(self._rules, self._packer)
        ).with_output_types(tuple[str, list[bytes]]).with_outputs(self.BOTS, main=contract.TAG_REST)
        return split[self.BOTS], split[contract.TAG_REST]

    def expand(self, events):
        crawlers, keyed = self._crawlers_and_keyed(events)
        judged = self._judge(keyed)  # in the global window, as its input (a GroupByKey or state keeps it)
        bots = (crawlers, judged[self.BOTS]) | "AllBots" >> beam.Flatten()
        outputs = {tag: judged[tag] for tag in self._output_tags()}
        return {**outputs, contract.TAG_HUMANS: judged[contract.TAG_HUMANS], self.BOTS: bots}


class FilterBotsStreaming(FilterBots):
    """Unbounded events -> the same split as FilterBots: each user's open events wait in state and a
    run is judged once an event-time timer says it has closed. Output is behind the watermark by up to
    max_run_duration + lateness (`output_delay_s`); downstream windows allow that.

    Args:
      rules, session_gap_s: as for FilterBots.
      lateness_s: `time.lateness`: a run is judged once every event of it that is not too late is in.
    """

    def __init__(self, rules: BotRules, session_gap_s: float = 1800.0, lateness_s: float = 3600.0):
        super().__init__(rules, session_gap_s)
        self._lateness_s = lateness_s

    def _crawlers_and_keyed(self, events):
        crawler = events | "CrawlerUserAgents" >> beam.ParDo(_CrawlerFn(self._rules)).with_outputs(
            self.BOTS, main=contract.TAG_REST
        )
        keyed = crawler[contract.TAG_REST] | "KeyByUser" >> beam.Map(lambda e: (e["user_id"], e)).with_output_types(
            tuple[str, dict]
        )
        return crawler[self.BOTS], keyed

    def _judge(self, keyed):
        return keyed | "JudgeOpenRuns" >> beam.ParDo(
            _UserRunsStreamingFn(self._rules, self._session_gap_s, self._lateness_s)
        ).with_outputs(self.BOTS, main=contract.TAG_HUMANS)
