"""Labels: exposures (impressions) joined to outcomes inside an attribution window.

An exposure is an `impression` with an `item_id` (and usually a `request_id`). Outcomes are the
configured event types for the same user and item. Both are keyed by (user_id, item_id), so an
outcome with a `request_id` joins the exposure of that request, and one without joins the latest
exposure of the item at or before it, within `window` of event time.

When an exposure's label is final, exactly one label is emitted for it: positive or negative by the
YAML rules (positive types with weights, a minimum dwell for a click, explicit negatives), with the
exposure's request, position, propensity, policy, experiment, session and device.

Timing rules, all in terms of event time and recorded arrival time, so a replay of the archive in
batch reproduces the streaming result:
- An exposure's label is due at `deadline = impression_time + max(window, lateness)`: by then every
  non-too-late exposure has arrived (arrival <= event time + lateness), and the attribution window is over.
- An attributed outcome counts in the label when it arrived by the deadline (or has no arrival time,
  as in a plain archive). One that arrived later is a *late outcome*: written as a label correction.
- An outcome that matches no exposure is an *orphan* (a logging-gap signal). In streaming that is
  decided at `outcome_time + clock_skew + lateness`, after which any exposure it could match would
  be too late anyway.
Streaming (stateful DoFn with event-time timers) and batch (GroupByKey) call the same `settle`.
The one divergence: an outcome that arrived before the deadline but is still inside the pipeline when
the watermark passes it becomes a late outcome in streaming and part of the label in batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import operator
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms import contract
from transforms.evaluation import load_position_weights
from transforms.records import KeyedListsFn, RecordPacker, pack_values, unpack_values

METRICS_NS = "feedback.labels"
EXPOSURE_TYPE = "impression"
_FOREVER = 2**62


@dataclasses.dataclass(frozen=True)
class LabelRules:
    window_ms: int
    lateness_ms: int
    clock_skew_ms: int
    positive_weights: tuple[tuple[str, float], ...]  # (event_type, weight), e.g. purchase 5, add_to_cart 3, click 1
    negative_weights: tuple[tuple[str, float], ...]  # explicit negatives, e.g. skip 1
    default_negative_weight: float
    min_click_dwell_ms: int
    outcome_types: frozenset
    # ((position, inverse-propensity weight), ...) from labels.position_weights; empty: no correction
    position_weights: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_config(cls, labels_cfg, lateness_s: float) -> LabelRules:
        pos = tuple(sorted(labels_cfg.positive.items(), key=lambda kv: (-kv[1], kv[0])))
        neg = tuple(sorted(labels_cfg.negative.items(), key=lambda kv: (-kv[1], kv[0])))
        weights = load_position_weights(labels_cfg.position_weights) if labels_cfg.position_weights else ()
        return cls(
            int(labels_cfg.window * 1000),
            int(lateness_s * 1000),
            int(labels_cfg.clock_skew * 1000),
            pos,
            neg,
            labels_cfg.default_negative_weight,
            int(labels_cfg.min_click_dwell_ms),
            frozenset(labels_cfg.outcome_types),
            weights,
        )

    def position_weight(self, position: int | None) -> float:
        """Inverse examination propensity of a position (a position past the table takes its last entry)."""
        if not self.position_weights or position is None or position < 1:
            return 1.0
        i = bisect.bisect_right(_first_of_pairs(self.position_weights), position)
        return self.position_weights[i - 1][1] if i else 1.0

    def deadline(self, impression_time: int) -> int:
        return impression_time + max(self.window_ms, self.lateness_ms)

    def orphan_deadline(self, outcome_time: int) -> int:
        return outcome_time + self.clock_skew_ms + max(self.window_ms, self.lateness_ms)


# Per-rules lookups built once, not per label (the rules are a frozen, hashable dataclass's tuples).
@functools.lru_cache(maxsize=64)
def _as_dict(pairs: tuple) -> dict:
    return dict(pairs)


@functools.lru_cache(maxsize=64)
def _first_of_pairs(pairs: tuple) -> list:
    return [p for p, _ in pairs]


def is_exposure(e: dict) -> bool:
    return e["event_type"] == EXPOSURE_TYPE and e.get("item_id") is not None


def attribute(exposures: list[dict], outcomes: list[dict], rules: LabelRules) -> dict[str, str | None]:
    """outcome event_id -> exposure event_id (or None: orphan), for one (user, item).

    With a request_id, the outcome joins an exposure of that request within
    [impression - clock_skew, impression + window]; the latest such one. Without, the latest exposure
    of the item at or before the outcome within the window.

    Copies of one event_id further apart than the dedupe horizon are all kept; the latest of them in
    event time decides the id's match, whatever order the runner grouped them in.
    """
    ordered = sorted(exposures, key=lambda x: (x["event_time"], x["event_id"]))
    times = [x["event_time"] for x in ordered]
    result = {}
    # (Two copies with one id and one event time never both get here: dedupe keeps one of them.)
    for o in sorted(outcomes, key=lambda o: (o["event_time"], o.get("arrival_time") or 0, o["event_id"])):
        t = o["event_time"]
        match = None
        if o.get("request_id") is not None:
            for x in reversed(ordered):
                if (
                    x.get("request_id") == o["request_id"]
                    and x["event_time"] - rules.clock_skew_ms <= t <= x["event_time"] + rules.window_ms
                ):
                    match = x
                    break
        else:
            i = bisect.bisect_right(times, t)
            if i and t - times[i - 1] <= rules.window_ms:
                match = ordered[i - 1]
        result[o["event_id"]] = match["event_id"] if match else None
    return result


def make_label(x: dict, outcomes: list[dict], rules: LabelRules) -> dict:
    """The label of one exposure from the outcomes that count for it."""
    if not outcomes:  # most exposures: nothing followed
        types, dwell, first = [], None, None
        label, weight = 0, rules.default_negative_weight
    else:
        types = sorted({o["event_type"] for o in outcomes})
        dwell = max([o["dwell_ms"] for o in outcomes if o.get("dwell_ms") is not None], default=None)
        positive, negatives = _as_dict(rules.positive_weights), _as_dict(rules.negative_weights)
        counting = [
            t
            for t in types
            if t in positive
            and not (t == "click" and rules.min_click_dwell_ms > 0 and (dwell or 0) < rules.min_click_dwell_ms)
        ]
        if counting:
            label, weight = 1, max(positive[t] for t in counting)
        elif any(t in negatives for t in types):
            label, weight = 0, max(negatives[t] for t in types if t in negatives)
        else:
            label, weight = 0, rules.default_negative_weight
        if label:  # unbiased learning to rank: a click counts 1 / P(examined at its position)
            weight *= rules.position_weight(x.get("position"))
        first = min(o["event_time"] for o in outcomes)
    item_meta = x.get("item_meta") or {}
    return {
        "label_id": x["event_id"],
        "request_id": x.get("request_id"),
        "user_id": x["user_id"],
        "item_id": x["item_id"],
        "item_category": item_meta.get("category"),
        "position": x.get("position"),
        "propensity": x.get("propensity"),
        "policy": x.get("policy"),
        "experiment_id": x.get("experiment_id"),
        "variant": x.get("variant"),
        "session_id": x.get("session_id"),
        "device_class": x.get("device_class"),
        "impression_time": x["event_time"],
        "label": label,
        "weight": float(weight),
        "outcome_types": types,
        "first_outcome_delay_ms": None if first is None else first - x["event_time"],
        "dwell_ms": dwell,
        "label_time": rules.deadline(x["event_time"]),
    }


def outcome_record(o: dict, exposure_id: str | None, kind: str) -> dict:
    """An orphan or late outcome, as written: enough to find and correct the label."""
    return {
        "kind": kind,
        "event_id": o["event_id"],
        "event_type": o["event_type"],
        "event_time": o["event_time"],
        "arrival_time": o.get("arrival_time"),
        "user_id": o["user_id"],
        "item_id": o.get("item_id"),
        "request_id": o.get("request_id"),
        "label_id": exposure_id,
    }


@dataclasses.dataclass
class Settlement:
    labels: list[dict]
    orphans: list[dict]
    late_outcomes: list[dict]
    consumed: set = dataclasses.field(default_factory=set)  # outcome ids counted in a settled label


def settle(
    exposures: list[dict],
    outcomes: list[dict],
    rules: LabelRules,
    now: int = _FOREVER,
    emitted: frozenset = frozenset(),
    reported: frozenset = frozenset(),
) -> Settlement:
    """Everything decided by event time `now` for one (user, item) and not yet emitted/reported.

    Batch calls it once with now = +inf. Streaming calls it on each timer with the timer's time,
    passing the exposure ids already labelled and the outcome ids already reported.
    """
    match = attribute(exposures, outcomes, rules)
    by_exposure: dict[str, list[dict]] = {}
    for o in outcomes:
        if match[o["event_id"]] is not None:
            by_exposure.setdefault(match[o["event_id"]], []).append(o)
    labels, orphans, late, consumed = [], [], [], set()
    for x in sorted(exposures, key=lambda x: (x["event_time"], x["event_id"])):
        deadline = rules.deadline(x["event_time"])
        if deadline > now:
            continue
        attributed = by_exposure.get(x["event_id"], [])
        on_time = [o for o in attributed if o.get("arrival_time") is None or o["arrival_time"] <= deadline]
        on_time_ids = {o["event_id"] for o in on_time}
        consumed |= on_time_ids
        if x["event_id"] not in emitted:
            labels.append(make_label(x, on_time, rules))
        for o in attributed:
            if o["event_id"] not in on_time_ids and o["event_id"] not in reported:
                late.append(outcome_record(o, x["event_id"], "late_outcome"))
    for o in outcomes:
        if (
            match[o["event_id"]] is None
            and rules.orphan_deadline(o["event_time"]) <= now
            and o["event_id"] not in reported
        ):
            orphans.append(outcome_record(o, None, "orphan"))
    return Settlement(labels, orphans, late, consumed)


def label_polarity(label: dict) -> str:
    """The sub-counter of a label: `labels.positive` or `labels.negative` (contract.COUNTER_LABELS_*)."""
    return "positive" if label["label"] else "negative"


_EXPOSURE, _OUTCOME = 0, 1


def _role(e: dict, rules: LabelRules) -> int | None:
    """_EXPOSURE, _OUTCOME (an outcome type with an item) or None: what settling makes of an event."""
    if is_exposure(e):
        return _EXPOSURE
    if e["event_type"] in rules.outcome_types and e.get("item_id") is not None:
        return _OUTCOME
    return None


def split_events(events: Iterable[dict], rules: LabelRules) -> tuple[list[dict], list[dict]]:
    split: tuple = ([], [])
    for e in events:
        role = _role(e, rules)
        if role is not None:
            split[role].append(e)
    return split


def settle_user(events: Iterable[dict], rules: LabelRules) -> Iterator[Settlement]:
    """One user's human events -> the settlement of each of the user's items: what JoinLabels settles
    per (user, item) key, for a step that already holds each user's events together."""
    by_item: dict = {}
    for e in events:
        role = _role(e, rules)
        if role is not None:
            by_item.setdefault(e["item_id"], ([], []))[role].append(e)
    for exposures, outcomes in by_item.values():
        yield settle(exposures, outcomes, rules)


# --- transforms -------------------------------------------------------------------------------


def _key(e: dict) -> str:
    # user and item ids are free text: join them with a separator that cannot be confused.
    return f"{len(e['user_id'])}:{e['user_id']}|{e['item_id']}"


def settle_counters() -> dict:
    """The Beam counters of settling (feedback.labels.<name>; README lists them)."""
    return {k: Metrics.counter(METRICS_NS, k) for k in ("labels", "positives", "orphans", "late_outcomes")}


class _SettleBatchFn(beam.DoFn):
    """(user|item, events) -> settled labels and outcomes. `packer`: the events come packed by it; None:
    as dicts."""

    def __init__(self, rules: LabelRules, packer: RecordPacker | None = None):
        self._rules = rules
        self._packer = packer
        self._counters = settle_counters()

    def process(self, keyed):
        _, events = keyed
        if self._packer is not None:
            events = self._packer.unpacked(events)
        exposures, outcomes = split_events(events, self._rules)
        yield from settlement_outputs(settle(exposures, outcomes, self._rules), self._counters)


def settlement_outputs(s: Settlement, counters, stamp_delay_ms: int | None = None, labels_tag: str | None = None):
    """Settled records -> outputs: labels on the main output (or under `labels_tag`), orphans and late
    outcomes under JoinLabels' tags. `stamp_delay_ms` (streaming) stamps them for the windows downstream;
    None (bounded graph: no event-time windows) leaves them as they are, which spares a window assignment
    per element."""
    stamp = (lambda r, t: r) if stamp_delay_ms is None else (lambda r, t: window.TimestampedValue(r, t / 1000.0))
    for label in s.labels:
        counters["labels"].inc()
        if label["label"]:
            counters["positives"].inc()
        # Stamped when the label became final: label_time plus the delay the timer waits for upstream
        # buckets -- the timer's own time, so labels are on time for the windows after (a request's
        # slate then comes in one pane, not one late pane per label).
        out = stamp(label, label["label_time"] + (stamp_delay_ms or 0))
        yield out if labels_tag is None else beam.pvalue.TaggedOutput(labels_tag, out)
    for o in s.orphans:
        counters["orphans"].inc()
        yield beam.pvalue.TaggedOutput(JoinLabels.ORPHANS, stamp(o, o["event_time"]))
    for o in s.late_outcomes:
        counters["late_outcomes"].inc()
        yield beam.pvalue.TaggedOutput(JoinLabels.LATE_OUTCOMES, stamp(o, o["event_time"]))


class _SettleStreamingFn(beam.DoFn):
    """Buffers a key's exposures and outcomes; on each due time, settles what is due.

    State names carry a `labels_` prefix (timer names must be unique across a pipeline).
    """

    EVENTS = BagStateSpec("labels_events", PickleCoder())
    DONE = ReadModifyWriteStateSpec("labels_done", PickleCoder())  # (emitted exposure ids, reported outcome ids)
    NEXT = ReadModifyWriteStateSpec("labels_next_due", VarIntCoder())
    DUE = TimerSpec("labels_due", TimeDomain.WATERMARK)

    def __init__(self, rules: LabelRules, upstream_delay_ms: int = 0):
        self._rules = rules
        # Events reach this step up to `upstream_delay_ms` behind the watermark (the per-user bot and
        # session buckets close at bucket end + lateness). Timers wait that much longer than the
        # event-time deadline, so every outcome that counts under the rule has arrived when it fires.
        self._delay = upstream_delay_ms
        self._counters = settle_counters()

    def _due(self, e: dict) -> int:
        if is_exposure(e):
            return self._rules.deadline(e["event_time"]) + self._delay
        return self._rules.orphan_deadline(e["event_time"]) + self._delay

    def process(
        self,
        keyed,
        events=beam.DoFn.StateParam(EVENTS),
        done=beam.DoFn.StateParam(DONE),
        next_due=beam.DoFn.StateParam(NEXT),
        due=beam.DoFn.TimerParam(DUE),
    ):
        _, e = keyed
        emitted, reported = done.read() or (frozenset(), frozenset())
        if not is_exposure(e) and emitted:
            # An outcome for an exposure already labelled is a correction, emitted at once.
            exposures = [x for x in events.read() if is_exposure(x)]
            match = attribute(exposures, [e], self._rules).get(e["event_id"])
            if match in emitted:
                self._counters["late_outcomes"].inc()
                done.write((emitted, reported | {e["event_id"]}))
                yield beam.pvalue.TaggedOutput(JoinLabels.LATE_OUTCOMES, outcome_record(e, match, "late_outcome"))
                events.add(e)
                return
        events.add(e)
        when = self._due(e)
        current = next_due.read()
        if current is None or when < current:
            next_due.write(when)
            due.set(Timestamp(micros=when * 1000))

    @on_timer(DUE)
    def _on_due(
        self,
        fire=beam.DoFn.TimestampParam,
        events=beam.DoFn.StateParam(EVENTS),
        done=beam.DoFn.StateParam(DONE),
        next_due=beam.DoFn.StateParam(NEXT),
        due=beam.DoFn.TimerParam(DUE),
    ):
        now = fire.micros // 1000 - self._delay  # the event-time deadline this firing settles
        buffered = list(events.read())
        emitted, reported = done.read() or (frozenset(), frozenset())
        exposures, outcomes = split_events(buffered, self._rules)
        s = settle(exposures, outcomes, self._rules, now=now, emitted=emitted, reported=reported)
        emitted = emitted | {l["label_id"] for l in s.labels}
        reported = reported | {o["event_id"] for o in s.orphans + s.late_outcomes} | s.consumed
        yield from settlement_outputs(s, self._counters, self._delay)
        # Keep what a later outcome may still need; drop what no future decision can touch.
        horizon = self._rules.window_ms + self._rules.lateness_ms + self._rules.clock_skew_ms
        keep = [
            e
            for e in buffered
            if (e["event_id"] not in emitted and e["event_id"] not in reported) or e["event_time"] + horizon > now
        ]
        pending = [
            self._due(e)
            for e in keep
            if e["event_id"] not in emitted and e["event_id"] not in reported and self._due(e) > now + self._delay
        ]
        events.clear()
        for e in keep:
            events.add(e)
        if not keep:
            done.clear()
            next_due.clear()
            return
        kept_ids = {e["event_id"] for e in keep}
        done.write((frozenset(emitted & kept_ids), frozenset(reported & kept_ids)))
        # Wake again for the next decision, or to forget the key once nothing can change.
        when = min(pending) if pending else max(e["event_time"] for e in keep) + horizon + self._delay + 1
        next_due.write(when)
        due.set(Timestamp(micros=when * 1000))


@beam.typehints.with_input_types(dict)
class JoinLabels(beam.PTransform):
    """Bounded human events -> labels (main), orphan outcomes (ORPHANS) and late outcomes
    (LATE_OUTCOMES): every (user, item) key grouped and settled at once. JoinLabelsStreaming settles
    the same keys with event-time timers, with the same function.

    Args:
      rules: attribution window, lateness and outcome types (LabelRules.from_config).
      packer: packs the events through the per-(user, item) GroupByKey (RecordPacker); default: every
        event as a whole dict.
    """

    ORPHANS = "orphans"
    LATE_OUTCOMES = "late_outcomes"

    def __init__(self, rules: LabelRules, packer: RecordPacker | None = None):
        super().__init__()
        if rules.window_ms <= 0:
            raise ValueError("attribution window must be > 0")
        self._rules = rules
        self._packer = packer or RecordPacker()

    def _keyed(self, events, pack=None):
        types = self._rules.outcome_types | {EXPOSURE_TYPE}
        relevant = events | "ExposuresAndOutcomes" >> beam.Filter(
            lambda e: e["event_type"] in types and e.get("item_id") is not None
        )
        if pack is None:
            return relevant | "KeyByUserItem" >> beam.Map(lambda e: (_key(e), e)).with_output_types(tuple[str, dict])
        return relevant | "KeyByUserItem" >> beam.Map(lambda e: (_key(e), pack(e))).with_output_types(tuple[str, bytes])

    def expand(self, events: beam.PCollection[dict]) -> beam.pvalue.DoOutputsTuple:
        return (
            self._keyed(events, self._packer.pack)
            | "GroupUserItem" >> beam.GroupByKey()
            | "Settle"
            >> beam.ParDo(_SettleBatchFn(self._rules, self._packer)).with_outputs(
                self.ORPHANS, self.LATE_OUTCOMES, main=contract.TAG_LABELS
            )
        )


@beam.typehints.with_input_types(dict)
class JoinLabelsStreaming(JoinLabels):
    """Unbounded human events -> the same outputs as JoinLabels, settled per key by event-time timers.

    Args:
      rules: as for JoinLabels.
      upstream_delay_s: how far behind the watermark events can reach this step.
    """

    def __init__(self, rules: LabelRules, upstream_delay_s: float = 0.0):
        super().__init__(rules)
        self._delay_ms = int(upstream_delay_s * 1000)

    def expand(self, events: beam.PCollection[dict]) -> beam.pvalue.DoOutputsTuple:
        fn = _SettleStreamingFn(self._rules, self._delay_ms)
        return self._keyed(events) | "SettleAsDue" >> beam.ParDo(fn).with_outputs(
            self.ORPHANS, self.LATE_OUTCOMES, main=contract.TAG_LABELS
        )


# --- slates -----------------------------------------------------------------------------------


def make_slate(request_id: str, labels: list[dict]) -> dict:
    items = sorted(labels, key=lambda l: (l["position"] if l["position"] is not None else 1 << 30, l["item_id"]))
    first = items[0]
    return {
        "request_id": request_id,
        "user_id": first["user_id"],
        "policy": first["policy"],
        "experiment_id": first["experiment_id"],
        "variant": first["variant"],
        "impression_time": min(l["impression_time"] for l in items),
        "items": [
            {
                "item_id": l["item_id"],
                "position": l["position"],
                "propensity": l["propensity"],
                "label": l["label"],
                "weight": l["weight"],
            }
            for l in items
        ],
        "n_items": len(items),
        "n_positive": sum(l["label"] for l in items),
    }


# What make_slate reads of a label (besides the request id, the key): the bounded graph shuffles these
# values alone, about half of a label's bytes.
SLATE_LABEL_FIELDS = (
    "user_id",
    "policy",
    "experiment_id",
    "variant",
    "impression_time",
    "item_id",
    "position",
    "propensity",
    "label",
    "weight",
)


_slate_fields = operator.itemgetter(*SLATE_LABEL_FIELDS)  # a label's slate fields, as one tuple


class _SlateInputListsFn(KeyedListsFn):
    """Labels -> (request id, [packed slate fields]) lists gathered per bundle (KeyedListsFn); nothing
    for a label without a request id. A request's labels come out of one user's group together, so a
    list usually holds a whole slate."""

    def process(self, label: dict):
        if label["request_id"] is not None:
            yield from self._add(label["request_id"], pack_values(_slate_fields(label)))


def _slate_of_packed(request_id: str, lists: Iterable[list[bytes]]) -> dict:
    labels = [dict(zip(SLATE_LABEL_FIELDS, unpack_values(p))) for packed in lists for p in packed]
    return make_slate(request_id, labels)


@beam.typehints.with_input_types(dict)
class BuildSlates(beam.PTransform):
    """Bounded labels (global window) -> one slate per request (all items shown, with positions,
    propensities and labels). BuildSlatesStreaming gathers a request's labels in session windows instead. In the
    bounded graph only the fields a slate holds cross the GroupByKey, packed (SLATE_LABEL_FIELDS), in
    lists gathered per bundle (`_SlateInputListsFn`)."""

    def expand(self, labels: beam.PCollection[dict]) -> beam.PCollection[dict]:
        KeyedListsFn.require_global_window(labels, "BuildSlates")
        return (
            labels
            | "KeyByRequest" >> beam.ParDo(_SlateInputListsFn()).with_output_types(tuple[str, list[bytes]])
            | "GroupRequest" >> beam.GroupByKey()
            | "Slate" >> beam.MapTuple(_slate_of_packed)
        )


@beam.typehints.with_input_types(dict)
class BuildSlatesStreaming(BuildSlates):
    """Unbounded labels -> one slate per request, gathered in a short session window per request.

    Args:
      gap_s: session gap between a request's labels.
      allowed_lateness_s: how late labels may reach the session windows.
    """

    def __init__(self, gap_s: float = 10.0, allowed_lateness_s: float = 0.0):
        super().__init__()
        self._gap_s, self._lateness_s = gap_s, allowed_lateness_s

    def expand(self, labels: beam.PCollection[dict]) -> beam.PCollection[dict]:
        # A request's labels share (nearly) one impression time: a short session window gathers them.
        # Labels are emitted when their deadline timer fires, often well behind the watermark: the
        # windows must allow that lateness or Beam drops them silently (seen with Pub/Sub end to end).
        return (
            labels
            | "WithRequest" >> beam.Filter(lambda l: l["request_id"] is not None)
            | "KeyByRequest" >> beam.Map(lambda l: (l["request_id"], l)).with_output_types(tuple[str, dict])
            | "RequestWindows" >> beam.WindowInto(window.Sessions(self._gap_s), allowed_lateness=self._lateness_s)
            | "GroupRequest" >> beam.GroupByKey()
            | "Slate" >> beam.MapTuple(lambda r, ls: make_slate(r, list(ls)))
        )


def _opt(name, t):
    return {"name": name, "type": ["null", t], "default": None}


LABEL_SCHEMA = {
    "type": "record",
    "name": "Label",
    "namespace": "feedback.labels",
    "doc": "One exposure (impression) and what followed it inside the attribution window.",
    "fields": [
        {"name": "label_id", "type": "string", "doc": "event_id of the impression"},
        _opt("request_id", "string"),
        {"name": "user_id", "type": "string"},
        {"name": "item_id", "type": "string"},
        _opt("item_category", "string"),
        _opt("position", "int"),
        _opt("propensity", "double"),
        _opt("policy", "string"),
        _opt("experiment_id", "string"),
        _opt("variant", "string"),
        _opt("session_id", "string"),
        _opt("device_class", "string"),
        {"name": "impression_time", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "label", "type": "int"},
        {"name": "weight", "type": "double"},
        {"name": "outcome_types", "type": {"type": "array", "items": "string"}},
        _opt("first_outcome_delay_ms", "long"),
        _opt("dwell_ms", "long"),
        {
            "name": "label_time",
            "type": {"type": "long", "logicalType": "timestamp-millis"},
            "doc": "impression_time + max(attribution window, lateness): when the label became final",
        },
    ],
}

SLATE_SCHEMA = {
    "type": "record",
    "name": "Slate",
    "namespace": "feedback.labels",
    "doc": "All items one request showed, with positions, propensities and labels (list-wise / IPS training).",
    "fields": [
        {"name": "request_id", "type": "string"},
        {"name": "user_id", "type": "string"},
        _opt("policy", "string"),
        _opt("experiment_id", "string"),
        _opt("variant", "string"),
        {"name": "impression_time", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "items",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "SlateItem",
                    "fields": [
                        {"name": "item_id", "type": "string"},
                        _opt("position", "int"),
                        _opt("propensity", "double"),
                        {"name": "label", "type": "int"},
                        {"name": "weight", "type": "double"},
                    ],
                },
            },
        },
        {"name": "n_items", "type": "int"},
        {"name": "n_positive", "type": "int"},
    ],
}
