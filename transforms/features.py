"""Entity features over sliding event-time windows: per user, item and (user, item category).

One feature row per (entity, window spec, window) that saw at least one event of the entity:
counts per event type, a Beta-smoothed CTR, dwell statistics, distinct counterparts, recency and an
exponentially decayed engagement score, all relative to the window's end. Windows are [start, end)
in event time, so a row describes only events strictly before `window_end`; `pipelines.pit_join`
relies on that to attach rows to labels without leakage.

Computation: a `CombineFn` per (entity, window), not GroupByKey + the pure function. Every event lands
in size/period windows (12 for 1h/5m, 24 for 24h/1h), so the shuffle dominates; combiner lifting
folds an active entity's events of a bundle into one accumulator per window before it, and a hot
entity never has to hold all its events in one list (only its dwell values). The accumulator
is mergeable: counts, the dwell values (percentiles need them all), the set of counterpart ids, the
last event time, and the decayed sum kept relative to a reference time (its latest event), rescaled
when merged. Summing 0.5^((end - t)/half_life) directly would need the window end, which a CombineFn
does not see, and 2^(t/half_life) over epoch milliseconds overflows. The window end is applied
afterwards, in `_ToFeatureRowFn` (window bounds from `DoFn.WindowParam`). `compute_features` runs the
very same accumulator code on a plain list, so the unit tests check what the pipeline computes.
For bounded input, `ComputeFeatures(..., keyed_windows=True)` gives the same rows without WindowInto:
one GroupByKey per entity, then `entity_rows` in plain Python (events combined per slot, slots merged
into windows) -- the window fan-out costs no Beam elements (see the class docstring).

Streaming: pass a trigger (e.g. `AfterWatermark(late=AfterCount(1))`) and keep ACCUMULATING (the
default here when a trigger is given): a late-but-allowed event then re-emits its windows' complete
rows, with more `n_events`; `pit_join` keeps, per window, the row with the most events.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger as beam_trigger
from apache_beam.transforms import window

# Config and row schema live in features_config, the Parquet sink in features_sink; re-exported here so that
# `from transforms.features import ...` keeps giving the whole feature API.
from transforms.features_config import (
    ENTITY_TYPES,
    EVENT_TYPES,
    FEATURE_COLUMNS,
    KEY_COLUMNS,  # noqa: F401
    METRICS_NS,
    ROW_COLUMNS,
    UNKNOWN_CATEGORY,
    FeaturesConfig,
    SlidingWindowSpec,
    features_for_entity,
)
from transforms.features_sink import WriteOfflineFeatures, arrow_schema, partition_of  # noqa: F401
from transforms.records import KeyedListsFn, append_to

__all__ = [
    "SlidingWindowSpec",
    "FeaturesConfig",
    "FeatureParams",
    "ComputeFeatures",
    "WriteOfflineFeatures",
    "EVENT_TYPES",
    "ENTITY_TYPES",
    "KEY_COLUMNS",
    "FEATURE_COLUMNS",
    "ROW_COLUMNS",
    "arrow_schema",
    "compute_features",
    "compute_all",
    "entity_rows",
    "window_bounds",
    "entity_inputs",
    "features_for_entity",
]


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """The picklable numbers the workers need, taken from a FeaturesConfig on the launcher."""

    ctr_alpha: float
    ctr_beta: float
    half_life_ms: float
    weights: tuple[tuple[str, float], ...]

    @classmethod
    def from_config(cls, cfg: FeaturesConfig) -> FeatureParams:
        return cls(
            cfg.ctr_prior_alpha,
            cfg.ctr_prior_beta,
            cfg.half_life * 1000.0,
            tuple(sorted(cfg.engagement_weights.items())),
        )


def _params(cfg) -> FeatureParams:
    return cfg if isinstance(cfg, FeatureParams) else FeatureParams.from_config(cfg)


# --- pure functions --------------------------------------------------------------------------


def window_bounds(t_ms: int, size_ms: int, period_ms: int) -> list[tuple[int, int]]:
    """The [start, end) windows of SlidingWindows(size, period) holding an event at t_ms, latest first."""
    start = t_ms - t_ms % period_ms
    return [(s, s + size_ms) for s in range(start, t_ms - size_ms, -period_ms)]


def entity_inputs(event: dict, entities: Sequence[str]) -> list[tuple[tuple[str, str], tuple]]:
    """An event -> ((entity_type, entity_id), (event_type, t_ms, dwell_ms, counterpart_id)) per entity.

    The counterpart is the item for user and user_category entities, the user for items. Events
    without item_id count for the user only.
    """
    etype, t, dwell = event["event_type"], event["event_time"], event.get("dwell_ms")
    user, item = event["user_id"], event.get("item_id")
    out = []
    if "user" in entities:
        out.append((("user", user), (etype, t, dwell, item)))
    if item is not None:
        if "item" in entities:
            out.append((("item", item), (etype, t, dwell, user)))
        if "user_category" in entities:
            category = (event.get("item_meta") or {}).get("category") or UNKNOWN_CATEGORY
            out.append((("user_category", f"{user}|{category}"), (etype, t, dwell, item)))
    return out


# Accumulator: a list (cheap to encode between the lifted and the final combine).
_COUNTS, _DWELL, _OTHERS, _LAST, _REF, _DECAY = range(6)


def _decay(dt_ms: float, half_life_ms: float) -> float:
    return 0.5 ** (dt_ms / half_life_ms)


def _new_accumulator() -> list:
    return [{}, [], set(), None, None, 0.0]


def _add_decayed(acc: list, ref: int, value: float, half_life_ms: float) -> None:
    if acc[_REF] is None:
        acc[_REF], acc[_DECAY] = ref, value
    elif ref <= acc[_REF]:
        acc[_DECAY] += value * _decay(acc[_REF] - ref, half_life_ms)
    else:
        acc[_DECAY] = acc[_DECAY] * _decay(ref - acc[_REF], half_life_ms) + value
        acc[_REF] = ref


def _add_input(acc: list, etype: str, t: int, dwell, other, weights: dict, half_life_ms: float) -> None:
    """One (event_type, t_ms, dwell_ms, counterpart) input into an accumulator (the CombineFn's and
    `entity_rows`' per-slot ones alike)."""
    counts = acc[_COUNTS]
    counts[etype] = counts.get(etype, 0) + 1
    if dwell is not None:
        acc[_DWELL].append(dwell)
    if other is not None:
        acc[_OTHERS].add(other)
    if acc[_LAST] is None or t > acc[_LAST]:
        acc[_LAST] = t
    w = weights.get(etype)
    if w:
        _add_decayed(acc, t, w, half_life_ms)


class _EntityWindowCombineFn(beam.CombineFn):
    """(event_type, t_ms, dwell_ms, counterpart) inputs -> summary of one entity in one window.

    decayed sum invariant: acc[_DECAY] == sum w_i * 0.5 ** ((acc[_REF] - t_i) / half_life), _REF the latest
    weighted event time; merging rescales the older reference to the newer one (terms stay <= weight).
    """

    def __init__(self, params: FeatureParams):
        self._weights = dict(params.weights)
        self._half_life_ms = params.half_life_ms

    def create_accumulator(self):
        return _new_accumulator()

    def add_input(self, acc, element):
        _add_input(acc, *element, self._weights, self._half_life_ms)
        return acc

    def merge_accumulators(self, accumulators):
        it = iter(accumulators)
        merged = next(it)
        for acc in it:
            for k, n in acc[_COUNTS].items():
                merged[_COUNTS][k] = merged[_COUNTS].get(k, 0) + n
            merged[_DWELL].extend(acc[_DWELL])
            merged[_OTHERS].update(acc[_OTHERS])
            if acc[_LAST] is not None and (merged[_LAST] is None or acc[_LAST] > merged[_LAST]):
                merged[_LAST] = acc[_LAST]
            if acc[_REF] is not None:
                _add_decayed(merged, acc[_REF], acc[_DECAY], self._half_life_ms)
        return merged

    def extract_output(self, acc):
        """(counts, sorted dwell values, distinct counterparts, last t, decay reference t, decayed sum)."""
        return acc[_COUNTS], sorted(acc[_DWELL]), len(acc[_OTHERS]), acc[_LAST], acc[_REF], acc[_DECAY]


_NUMPY_FROM = 64  # lists at least this long go to numpy; shorter ones are cheaper in plain Python


def percentiles_sorted(values: Sequence[float], qs: Sequence[float]) -> tuple[float, ...]:
    """numpy.percentile(values, qs) (default 'linear' method) of an ascending list, bit for bit.

    Most (entity, window) rows hold a handful of dwell values, where np.percentile's ~40 us of call
    overhead per row dominated the whole computation; this repeats numpy's index and lerp arithmetic.
    """
    if len(values) >= _NUMPY_FROM:
        return tuple(float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs))
    n, out = len(values), []
    for q in qs:
        virtual = (q / 100) * (n - 1)
        lo = min(max(math.floor(virtual), 0), n - 1)
        hi = min(lo + 1, n - 1)
        gamma = virtual - lo
        a, b = float(values[lo]), float(values[hi])
        diff = b - a
        out.append(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return tuple(out)


_COUNT_COLUMNS = tuple((t, f"n_{t}") for t in EVENT_TYPES)


def _window_free_features(
    entity_type: str, counts: dict, dwell: Sequence[float], distinct: int, params: FeatureParams
) -> dict:
    """The feature columns that do not depend on the window's bounds, from n_impression to the distinct
    counts, in ROW_COLUMNS order. `dwell` ascending. Windows holding the same events share these."""
    row = {name: counts.get(t, 0) for t, name in _COUNT_COLUMNS}
    row["n_events"] = sum(counts.values())
    row["ctr"] = (counts.get("click", 0) + params.ctr_alpha) / (
        counts.get("impression", 0) + params.ctr_alpha + params.ctr_beta
    )
    if dwell:
        row["dwell_mean_ms"] = sum(dwell) / len(dwell) if len(dwell) < _NUMPY_FROM else float(np.mean(dwell))
        row["dwell_p50_ms"], row["dwell_p90_ms"] = percentiles_sorted(dwell, (50, 90))
    else:
        row["dwell_mean_ms"] = row["dwell_p50_ms"] = row["dwell_p90_ms"] = None
    row["distinct_items"] = None if entity_type == "item" else distinct
    row["distinct_users"] = distinct if entity_type == "item" else None
    return row


def feature_row(
    entity_type: str,
    entity_id: str,
    window_label: str,
    window_start: int,
    window_end: int,
    summary: tuple,
    params: FeatureParams,
) -> dict:
    """A combine summary + window bounds -> the flat feature row (ROW_COLUMNS)."""
    counts, dwell, distinct, last_t, ref_t, decayed = summary
    return {
        "entity_type": entity_type,
        "entity_id": entity_id,
        "window": window_label,
        "window_start": window_start,
        "window_end": window_end,
        **_window_free_features(entity_type, counts, dwell, distinct, params),
        "recency_s": (window_end - last_t) / 1000.0,
        "decayed_engagement": 0.0 if ref_t is None else decayed * _decay(window_end - ref_t, params.half_life_ms),
    }


def compute_features(
    entity_type: str,
    entity_id: str,
    events: Iterable[dict],
    window_start: int,
    window_end: int,
    cfg,
    window_label: str = "",
) -> dict | None:
    """Features of one entity from its events in [window_start, window_end) (others are ignored), with
    the pipeline's own combine code; None when no event falls in the window. `cfg`: FeaturesConfig or
    FeatureParams."""
    params = _params(cfg)
    fn = _EntityWindowCombineFn(params)
    acc = fn.create_accumulator()
    seen = False
    for e in events:
        if window_start <= e["event_time"] < window_end:
            for (_et, eid), value in entity_inputs(e, (entity_type,)):
                if eid == entity_id:
                    fn.add_input(acc, value)
                    seen = True
    if not seen:
        return None
    return feature_row(entity_type, entity_id, window_label, window_start, window_end, fn.extract_output(acc), params)


def compute_all(events: Iterable[dict], cfg: FeaturesConfig) -> list[dict]:
    """Every feature row ComputeFeatures produces for these events (in the default, single-pane case),
    in plain Python: the reference the pipeline tests compare against."""
    params = FeatureParams.from_config(cfg)
    fn = _EntityWindowCombineFn(params)
    accs: dict = {}
    specs = [(spec.label, spec.size_ms, spec.period_ms) for spec in cfg.windows]
    for e in events:
        for key, value in entity_inputs(e, cfg.entities):
            for label, size_ms, period_ms in specs:
                for bounds in window_bounds(value[1], size_ms, period_ms):
                    k = (key, label, bounds)
                    acc = accs.get(k)
                    if acc is None:
                        acc = accs[k] = fn.create_accumulator()
                    fn.add_input(acc, value)
    return [
        feature_row(et, eid, label, start, end, fn.extract_output(acc), params)
        for ((et, eid), label, (start, end)), acc in sorted(accs.items(), key=lambda kv: kv[0])
    ]


def _slot_summaries(values: Iterable[tuple], slot_ms: int, params: FeatureParams) -> dict:
    """(event_type, t_ms, dwell_ms, counterpart) inputs -> {slot start: accumulator} (the
    `_EntityWindowCombineFn` accumulator, built by the same `_add_input`)."""
    weights, half_life_ms = dict(params.weights), params.half_life_ms
    slots: dict = {}
    for etype, t, dwell, other in values:
        start = t - t % slot_ms
        acc = slots.get(start)
        if acc is None:
            acc = slots[start] = _new_accumulator()
        _add_input(acc, etype, t, dwell, other, weights, half_life_ms)
    return slots


def _merged_slots(accs: Sequence[list], half_life_ms: float) -> list:
    """Slot accumulators in ascending slot order -> one accumulator, by the same steps as
    `_EntityWindowCombineFn.merge_accumulators` folding them one by one into an empty one. A single slot
    is returned as is (merging it into an empty accumulator would copy it unchanged)."""
    if len(accs) == 1:
        return accs[0]
    counts: dict = {}
    dwell: list = []
    others: set = set()
    last = ref = None
    decayed = 0.0
    for acc in accs:
        for k, n in acc[_COUNTS].items():
            counts[k] = counts.get(k, 0) + n
        dwell += acc[_DWELL]
        others |= acc[_OTHERS]
        if acc[_LAST] is not None and (last is None or acc[_LAST] > last):
            last = acc[_LAST]
        acc_ref = acc[_REF]
        if acc_ref is not None:
            if ref is None:
                ref, decayed = acc_ref, acc[_DECAY]
            elif acc_ref <= ref:
                decayed += acc[_DECAY] * _decay(ref - acc_ref, half_life_ms)
            else:
                decayed = decayed * _decay(acc_ref - ref, half_life_ms) + acc[_DECAY]
                ref = acc_ref
    return [counts, dwell, others, last, ref, decayed]


def entity_rows(
    entity_type: str, entity_id: str, values: Iterable[tuple], specs: Sequence[tuple[str, int, int]], cfg
) -> Iterable[dict]:
    """Every feature row of one entity, from all its (event_type, t_ms, dwell_ms, counterpart) inputs
    (`entity_inputs`), for window specs given as (label, size_ms, period_ms); rows in spec, then
    window order.

    Events are combined per slot first (the gcd of the periods: every instant of a slot lies in the
    same windows), then each window merges the slots it holds, in slot order, so the size/period
    fan-out costs one merge per slot and window instead of one input per event and window. Same
    accumulator steps as `_EntityWindowCombineFn` (as `compute_all`), so the same rows (decayed sums up
    to float rounding). Windows holding the same slots (an entity active in one slot is in
    size/period windows of each spec with the same events) share their merge and the columns that do
    not depend on the window's bounds.
    """
    params = _params(cfg)
    half_life_ms = params.half_life_ms
    slot_ms = functools.reduce(math.gcd, (period for _, _, period in specs))
    slots = _slot_summaries(values, slot_ms, params)
    starts = sorted(slots)  # a fixed merge order: the same floats on every runner
    accs = [slots[start] for start in starts]
    by_slot_range: dict = {}  # (first slot index, end slot index) -> (window-free columns, last, ref, decayed)
    for label, size_ms, period_ms in specs:
        window_starts: set = set()
        for start in starts:
            window_starts.update(range(start - start % period_ms, start - size_ms, -period_ms))
        for w_start in sorted(window_starts):
            w_end = w_start + size_ms
            slot_range = (bisect.bisect_left(starts, w_start), bisect.bisect_left(starts, w_end))
            shared = by_slot_range.get(slot_range)
            if shared is None:
                counts, dwell, others, last, ref, decayed = _merged_slots(
                    accs[slot_range[0] : slot_range[1]], half_life_ms
                )
                window_free = _window_free_features(entity_type, counts, sorted(dwell), len(others), params)
                shared = by_slot_range[slot_range] = (window_free, last, ref, decayed)
            window_free, last, ref, decayed = shared
            # `feature_row`'s dict (and `_decay`) inlined: this runs once per row; tests compare the two.
            yield {
                "entity_type": entity_type,
                "entity_id": entity_id,
                "window": label,
                "window_start": w_start,
                "window_end": w_end,
                **window_free,
                "recency_s": (w_end - last) / 1000.0,
                "decayed_engagement": 0.0 if ref is None else decayed * 0.5 ** ((w_end - ref) / half_life_ms),
            }


# --- transforms ------------------------------------------------------------------------------


class _KeyByEntityFn(beam.DoFn):
    def __init__(self, entities: tuple[str, ...]):
        self._entities = entities
        self._no_item = Metrics.counter(METRICS_NS, "events_without_item")

    def process(self, event: dict):
        if event.get("item_id") is None:
            self._no_item.inc()
        yield from entity_inputs(event, self._entities)


def gather_entity_inputs(by_entity: dict, event: dict, entities: Sequence[str]) -> int:
    """Appends the event's `entity_inputs` to `by_entity` ({entity key: [inputs]}); returns how many."""
    inputs = entity_inputs(event, entities)
    for key, value in inputs:
        append_to(by_entity, key, value)
    return len(inputs)


class _EntityInputListsFn(KeyedListsFn):
    """Bounded-input path: events (global window) -> (entity key, [inputs]) per entity, gathered over a
    bundle and flushed once `max_inputs` inputs are held (KeyedListsFn). The GroupByKey then carries one
    element per entity and flush rather than one per event and entity (~3 per event). Inputs stay in
    event order within a list."""

    def __init__(self, entities: tuple[str, ...], max_inputs: int = 50_000):
        super().__init__(max_inputs)
        self._entities = entities
        self._no_item = Metrics.counter(METRICS_NS, "events_without_item")

    def start_bundle(self):
        super().start_bundle()
        self._n_no_item = 0

    def process(self, event: dict):
        if event.get("item_id") is None:
            self._n_no_item += 1
        self._n += gather_entity_inputs(self._lists, event, self._entities)
        if self._n >= self._max_values:
            yield from self._drain()

    def _drain(self):
        if self._n_no_item:
            self._no_item.inc(self._n_no_item)
            self._n_no_item = 0
        return super()._drain()


class _ToFeatureRowFn(beam.DoFn):
    def __init__(self, window_label: str, params: FeatureParams):
        self._label = window_label
        self._params = params
        self._rows = Metrics.counter(METRICS_NS, "feature_rows")

    def process(self, element, w=beam.DoFn.WindowParam):
        (entity_type, entity_id), summary = element
        self._rows.inc()
        # Output keeps the combine's timestamp: the window's max timestamp (window_end - 1 ms in Beam 2.77).
        yield feature_row(
            entity_type, entity_id, self._label, w.start.micros // 1000, w.end.micros // 1000, summary, self._params
        )


class _EntityRowsFn(beam.DoFn):
    """Bounded-input path: all input lists of one entity -> all its feature rows (`entity_rows`), in the
    global window. Not stamped with their window's end: bounded sinks ignore element timestamps, and a
    TimestampedValue costs a window assignment per row (~2.5 rows per event)."""

    def __init__(self, specs: tuple[tuple[str, int, int], ...], params: FeatureParams):
        self._specs, self._params = specs, params
        self._rows = Metrics.counter(METRICS_NS, "feature_rows")

    def process(self, grouped):
        (entity_type, entity_id), value_lists = grouped
        values = itertools.chain.from_iterable(value_lists)
        n = 0
        for row in entity_rows(entity_type, entity_id, values, self._specs, self._params):
            n += 1
            yield row
        self._rows.inc(n)


class ComputeFeatures(beam.PTransform):
    """Clean events (global window, event-time timestamps) -> feature rows (dicts, ROW_COLUMNS) for every
    configured entity type and window spec, re-windowed into the global window.

    `trigger`/`accumulation_mode` are passed to every WindowInto; with a trigger and no mode, panes
    accumulate (each firing carries the whole window). Default (None): one pane per window at the
    watermark, which is what batch gives.

    `keyed_windows=True` (bounded input only, no trigger): the same rows without WindowInto. Each
    entity's inputs are grouped in the global window and `entity_rows` computes all its windows.
    Python runners push every element of a non-global window through the general trigger machinery,
    even in batch; on FnApiRunner that made the windowed path ~3x slower (2,000 events -> 180k rows:
    69 s vs 21 s). Keying by (entity, window start) and combining there instead paid Beam's
    per-element work size/period times per event and shuffled one accumulator per row (~20% more
    peak memory, benchmarks/RESULTS.md). An entity's group holds its small input tuples, not events,
    in lists gathered per bundle (`_EntityInputListsFn`).
    """

    def __init__(self, cfg: FeaturesConfig, trigger=None, accumulation_mode=None, keyed_windows: bool = False):
        super().__init__()
        if not isinstance(cfg, FeaturesConfig):
            raise TypeError(f"cfg must be a FeaturesConfig, got {type(cfg).__name__}")
        if keyed_windows and (trigger is not None or accumulation_mode is not None):
            raise ValueError("keyed_windows is for bounded input: it takes no trigger or accumulation mode")
        if trigger is not None and accumulation_mode is None:
            accumulation_mode = beam_trigger.AccumulationMode.ACCUMULATING
        self._cfg = cfg
        self._params = FeatureParams.from_config(cfg)
        self._trigger = trigger
        self._accumulation_mode = accumulation_mode
        self._keyed_windows = keyed_windows

    def expand(self, events):
        entities = tuple(self._cfg.entities)
        if self._keyed_windows:
            KeyedListsFn.require_global_window(events, "ComputeFeatures(keyed_windows=True)")
            specs = tuple((spec.label, spec.size_ms, spec.period_ms) for spec in self._cfg.windows)
            return (
                events
                | "KeyByEntity"
                >> beam.ParDo(_EntityInputListsFn(entities)).with_output_types(tuple[tuple[str, str], list])
                | "GroupEntity" >> beam.GroupByKey()
                | "EntityRows" >> beam.ParDo(_EntityRowsFn(specs, self._params))
            )
        keyed = events | "KeyByEntity" >> beam.ParDo(_KeyByEntityFn(entities)).with_output_types(
            tuple[tuple[str, str], tuple]
        )
        outputs = []
        for spec in self._cfg.windows:
            s = spec.slug
            rows = (
                keyed
                | f"Window_{s}"
                >> beam.WindowInto(
                    window.SlidingWindows(spec.size, spec.period),
                    trigger=self._trigger,
                    accumulation_mode=self._accumulation_mode,
                    allowed_lateness=self._cfg.allowed_lateness,
                )
                | f"Combine_{s}" >> beam.CombinePerKey(_EntityWindowCombineFn(self._params))
                | f"ToRows_{s}" >> beam.ParDo(_ToFeatureRowFn(spec.label, self._params))
                | f"GlobalWindow_{s}" >> beam.WindowInto(window.GlobalWindows())
            )
            outputs.append(rows)
        return outputs | "AllWindows" >> beam.Flatten()
