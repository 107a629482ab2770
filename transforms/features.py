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

import dataclasses
import datetime as dt
import functools
import math
import uuid
from typing import Iterable, Literal, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger as beam_trigger
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from pydantic import Field, field_validator, model_validator

from transforms import contract
from transforms.configbase import Duration, _Section

__all__ = ["SlidingWindowSpec", "FeaturesConfig", "FeatureParams", "ComputeFeatures", "WriteOfflineFeatures",
           "EVENT_TYPES", "ENTITY_TYPES", "KEY_COLUMNS", "FEATURE_COLUMNS", "ROW_COLUMNS", "arrow_schema",
           "compute_features", "compute_all", "entity_rows", "window_bounds", "entity_inputs", "features_for_entity"]

METRICS_NS = "feedback.features"
EVENT_TYPES: tuple[str, ...] = tuple(contract.DEFAULT_EVENT_TYPES)
ENTITY_TYPES: tuple[str, ...] = ("user", "item", "user_category")
UNKNOWN_CATEGORY = "unknown"

# Column name -> type ("string", "int64", "float64"); the Parquet schema and pit_join are built from these.
KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("entity_type", "string"), ("entity_id", "string"), ("window", "string"),
    ("window_start", "int64"), ("window_end", "int64"))
FEATURE_COLUMNS: tuple[tuple[str, str], ...] = (
    *((f"n_{t}", "int64") for t in EVENT_TYPES),
    ("n_events", "int64"),
    ("ctr", "float64"),                 # (clicks + alpha) / (impressions + alpha + beta)
    ("dwell_mean_ms", "float64"),       # None when the window has no dwell_ms value
    ("dwell_p50_ms", "float64"),
    ("dwell_p90_ms", "float64"),
    ("distinct_items", "int64"),        # user and user_category rows; None on item rows
    ("distinct_users", "int64"),        # item rows; None on user and user_category rows
    ("recency_s", "float64"),           # (window_end - last event time) / 1000
    ("decayed_engagement", "float64"),  # sum weight(type) * 0.5 ** ((window_end - t) / half_life)
)
ROW_COLUMNS = KEY_COLUMNS + FEATURE_COLUMNS
_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}


def arrow_schema() -> pa.Schema:
    key_names = {n for n, _ in KEY_COLUMNS}
    return pa.schema([pa.field(n, _ARROW_TYPES[t], nullable=n not in key_names) for n, t in ROW_COLUMNS])


def features_for_entity(entity_type: str) -> tuple[str, ...]:
    """The feature columns that can be non-null for an entity type."""
    skip = "distinct_items" if entity_type == "item" else "distinct_users"
    return tuple(n for n, _ in FEATURE_COLUMNS if n != skip)


# --- configuration ---------------------------------------------------------------------------

def _format_ms(ms: int) -> str:
    for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if ms % factor == 0:
            return f"{ms // factor}{unit}"
    raise AssertionError(ms)


class SlidingWindowSpec(_Section):
    size: Duration
    period: Duration

    @model_validator(mode="after")
    def _check(self):
        if self.period <= 0:
            raise ValueError("period must be > 0")
        size_ms, period_ms = self.size * 1000, self.period * 1000
        if size_ms != round(size_ms) or period_ms != round(period_ms):
            raise ValueError("size and period must be whole milliseconds")
        if size_ms <= 0 or round(size_ms) % round(period_ms):
            raise ValueError(f"size ({self.size}s) must be a positive multiple of period ({self.period}s)")
        return self

    @property
    def size_ms(self) -> int:
        return round(self.size * 1000)

    @property
    def period_ms(self) -> int:
        return round(self.period * 1000)

    @property
    def label(self) -> str:
        """'1h/5m', '24h/1h': the `window` column of feature rows."""
        return f"{_format_ms(self.size_ms)}/{_format_ms(self.period_ms)}"

    @property
    def slug(self) -> str:
        """The label as an identifier: '1h_5m' (step labels, pit_join column prefixes)."""
        return self.label.replace("/", "_")


class FeaturesConfig(_Section):
    windows: tuple[SlidingWindowSpec, ...] = (SlidingWindowSpec(size=3600, period=300),
                                             SlidingWindowSpec(size=86400, period=3600))
    ctr_prior_alpha: float = Field(1.0, gt=0, description="Beta prior pseudo-clicks.")
    ctr_prior_beta: float = Field(20.0, gt=0, description="Beta prior pseudo-non-clicks.")
    half_life: Duration = Field(21600.0, description="Half-life of the decayed engagement score.")
    engagement_weights: dict[str, float] = Field(
        default_factory=lambda: {"click": 1.0, "dwell": 0.5, "add_to_cart": 3.0, "purchase": 5.0})
    entities: tuple[Literal["user", "item", "user_category"], ...] = ENTITY_TYPES
    allowed_lateness: Duration = 0.0

    @field_validator("windows")
    @classmethod
    def _unique_windows(cls, v):
        if not v:
            raise ValueError("at least one window is needed")
        labels = [w.label for w in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"window specs must be unique, got {labels}")
        return v

    @field_validator("half_life")
    @classmethod
    def _positive_half_life(cls, v):
        if v <= 0:
            raise ValueError("half_life must be > 0")
        return v

    @field_validator("engagement_weights")
    @classmethod
    def _known_types(cls, v):
        unknown = sorted(set(v) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        if not all(math.isfinite(w) for w in v.values()):
            raise ValueError("weights must be finite")
        return v

    @field_validator("entities")
    @classmethod
    def _unique_entities(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("entities must be non-empty and unique")
        return v


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """The picklable numbers the workers need, taken from a FeaturesConfig on the launcher."""
    ctr_alpha: float
    ctr_beta: float
    half_life_ms: float
    weights: tuple[tuple[str, float], ...]

    @classmethod
    def from_config(cls, cfg: FeaturesConfig) -> "FeatureParams":
        return cls(cfg.ctr_prior_alpha, cfg.ctr_prior_beta, cfg.half_life * 1000.0,
                   tuple(sorted(cfg.engagement_weights.items())))


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


class _EntityWindowCombineFn(beam.CombineFn):
    """(event_type, t_ms, dwell_ms, counterpart) inputs -> summary of one entity in one window.

    decayed sum invariant: acc[_DECAY] == sum w_i * 0.5 ** ((acc[_REF] - t_i) / half_life), _REF the latest
    weighted event time; merging rescales the older reference to the newer one (terms stay <= weight).
    """

    def __init__(self, params: FeatureParams):
        self._weights = dict(params.weights)
        self._half_life_ms = params.half_life_ms

    def create_accumulator(self):
        return [{}, [], set(), None, None, 0.0]

    def add_input(self, acc, element):
        etype, t, dwell, other = element
        counts = acc[_COUNTS]
        counts[etype] = counts.get(etype, 0) + 1
        if dwell is not None:
            acc[_DWELL].append(dwell)
        if other is not None:
            acc[_OTHERS].add(other)
        if acc[_LAST] is None or t > acc[_LAST]:
            acc[_LAST] = t
        w = self._weights.get(etype)
        if w:
            self._add_decayed(acc, t, w)
        return acc

    def _add_decayed(self, acc, ref, value):
        if acc[_REF] is None:
            acc[_REF], acc[_DECAY] = ref, value
        elif ref <= acc[_REF]:
            acc[_DECAY] += value * _decay(acc[_REF] - ref, self._half_life_ms)
        else:
            acc[_DECAY] = acc[_DECAY] * _decay(ref - acc[_REF], self._half_life_ms) + value
            acc[_REF] = ref

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
                self._add_decayed(merged, acc[_REF], acc[_DECAY])
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


def feature_row(entity_type: str, entity_id: str, window_label: str, window_start: int, window_end: int,
                summary: tuple, params: FeatureParams) -> dict:
    """A combine summary + window bounds -> the flat feature row (ROW_COLUMNS)."""
    counts, dwell, distinct, last_t, ref_t, decayed = summary
    row = {"entity_type": entity_type, "entity_id": entity_id, "window": window_label,
           "window_start": window_start, "window_end": window_end}
    for t in EVENT_TYPES:
        row[f"n_{t}"] = counts.get(t, 0)
    row["n_events"] = sum(counts.values())
    row["ctr"] = (counts.get("click", 0) + params.ctr_alpha) / (
        counts.get("impression", 0) + params.ctr_alpha + params.ctr_beta)
    if dwell:
        row["dwell_mean_ms"] = sum(dwell) / len(dwell) if len(dwell) < _NUMPY_FROM else float(np.mean(dwell))
        row["dwell_p50_ms"], row["dwell_p90_ms"] = percentiles_sorted(dwell, (50, 90))
    else:
        row["dwell_mean_ms"] = row["dwell_p50_ms"] = row["dwell_p90_ms"] = None
    row["distinct_items"] = None if entity_type == "item" else distinct
    row["distinct_users"] = distinct if entity_type == "item" else None
    row["recency_s"] = (window_end - last_t) / 1000.0
    row["decayed_engagement"] = 0.0 if ref_t is None else decayed * _decay(window_end - ref_t, params.half_life_ms)
    return row


def compute_features(entity_type: str, entity_id: str, events: Iterable[dict], window_start: int, window_end: int,
                     cfg, window_label: str = "") -> Optional[dict]:
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
    return [feature_row(et, eid, label, start, end, fn.extract_output(acc), params)
            for ((et, eid), label, (start, end)), acc in sorted(accs.items(), key=lambda kv: kv[0])]


def entity_rows(entity_type: str, entity_id: str, values: Iterable[tuple], specs: Sequence[tuple[str, int, int]],
                cfg) -> Iterable[dict]:
    """Every feature row of one entity, from all its (event_type, t_ms, dwell_ms, counterpart) inputs
    (`entity_inputs`), for window specs given as (label, size_ms, period_ms); rows in spec, then
    window order.

    Events are combined per slot first (the gcd of the periods: every instant of a slot lies in the
    same windows), then each window merges the slots it holds, so the size/period fan-out costs one
    merge per slot and window instead of one input per event and window. Same combine code as
    `compute_all`, so the same rows (decayed sums up to float rounding).
    """
    params = _params(cfg)
    fn = _EntityWindowCombineFn(params)
    slot = functools.reduce(math.gcd, (period for _, _, period in specs))
    slots: dict = {}
    for value in values:
        start = value[1] - value[1] % slot
        acc = slots.get(start)
        if acc is None:
            acc = slots[start] = fn.create_accumulator()
        fn.add_input(acc, value)
    ordered = sorted(slots.items())   # a fixed merge order: the same floats on every runner
    for label, size_ms, period_ms in specs:
        windows: dict = {}
        for start, acc in ordered:
            for w_start, _ in window_bounds(start, size_ms, period_ms):
                merged = windows.get(w_start)
                if merged is None:
                    merged = windows[w_start] = fn.create_accumulator()
                fn.merge_accumulators([merged, acc])   # mutates `merged` only
        for w_start in sorted(windows):
            yield feature_row(entity_type, entity_id, label, w_start, w_start + size_ms,
                              fn.extract_output(windows[w_start]), params)


def partition_of(row: dict) -> str:
    """'date=YYYY-MM-DD' of the row's window_end (UTC)."""
    return _partition_of_day(row["window_end"] // 86_400_000)


@functools.lru_cache(maxsize=4096)
def _partition_of_day(day: int) -> str:
    # Called for every row written (~2.5 rows per event with the shipped windows); a run spans few days.
    return f"date={(dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()}"


# --- transforms ------------------------------------------------------------------------------

class _KeyByEntityFn(beam.DoFn):
    def __init__(self, entities: tuple[str, ...]):
        self._entities = entities
        self._no_item = Metrics.counter(METRICS_NS, "events_without_item")

    def process(self, event: dict):
        if event.get("item_id") is None:
            self._no_item.inc()
        yield from entity_inputs(event, self._entities)


class _ToFeatureRowFn(beam.DoFn):
    def __init__(self, window_label: str, params: FeatureParams):
        self._label = window_label
        self._params = params
        self._rows = Metrics.counter(METRICS_NS, "feature_rows")

    def process(self, element, w=beam.DoFn.WindowParam):
        (entity_type, entity_id), summary = element
        self._rows.inc()
        # Output keeps the combine's timestamp: the window's max timestamp (window_end - 1 ms in Beam 2.77).
        yield feature_row(entity_type, entity_id, self._label, w.start.micros // 1000, w.end.micros // 1000,
                          summary, self._params)


class _EntityRowsFn(beam.DoFn):
    """Bounded-input path: all inputs of one entity -> all its feature rows (`entity_rows`), each
    stamped with its window's max timestamp, as the windowed path gives."""

    def __init__(self, specs: tuple[tuple[str, int, int], ...], params: FeatureParams):
        self._specs, self._params = specs, params
        self._rows = Metrics.counter(METRICS_NS, "feature_rows")

    def process(self, grouped):
        (entity_type, entity_id), values = grouped
        n = 0
        for row in entity_rows(entity_type, entity_id, values, self._specs, self._params):
            n += 1
            yield window.TimestampedValue(row, Timestamp(micros=(row["window_end"] - 1) * 1000))
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
    peak memory, benchmarks/RESULTS.md). An entity's group holds its small input tuples, not events.
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
        keyed = events | "KeyByEntity" >> beam.ParDo(_KeyByEntityFn(tuple(self._cfg.entities))).with_output_types(
            tuple[tuple[str, str], tuple])
        if self._keyed_windows:
            specs = tuple((spec.label, spec.size_ms, spec.period_ms) for spec in self._cfg.windows)
            return (keyed
                    | "GroupEntity" >> beam.GroupByKey()
                    | "EntityRows" >> beam.ParDo(_EntityRowsFn(specs, self._params)))
        outputs = []
        for spec in self._cfg.windows:
            s = spec.slug
            rows = (keyed
                    | f"Window_{s}" >> beam.WindowInto(
                        window.SlidingWindows(spec.size, spec.period), trigger=self._trigger,
                        accumulation_mode=self._accumulation_mode, allowed_lateness=self._cfg.allowed_lateness)
                    | f"Combine_{s}" >> beam.CombinePerKey(_EntityWindowCombineFn(self._params))
                    | f"ToRows_{s}" >> beam.ParDo(_ToFeatureRowFn(spec.label, self._params))
                    | f"GlobalWindow_{s}" >> beam.WindowInto(window.GlobalWindows()))
            outputs.append(rows)
        return outputs | "AllWindows" >> beam.Flatten()


class _ParquetSink(fileio.FileSink):
    """Feature rows -> one Parquet file (arrow_schema), written in row groups of `batch_rows`.

    `create_metadata` also creates the row's partition folder under the output directory: WriteToFiles
    writes temp files then renames them to `<output_dir>/<file name>`, and a local rename into a missing
    folder fails (WriteToFiles only logs that at debug level; `_CheckWrittenFn` catches it too).
    """

    def __init__(self, output_dir: str, batch_rows: int = 65536):
        self._output_dir = output_dir
        self._batch_rows = batch_rows
        self._writer = None

    def create_metadata(self, destination, full_file_name):
        target = FileSystems.join(self._output_dir, destination)
        if FileSystems.get_filesystem(target).has_dirs() and not FileSystems.exists(target):
            try:
                FileSystems.mkdirs(target)
            except IOError:  # created meanwhile by another writer
                pass
        return fileio.FileMetadata(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED)

    def open(self, fh):
        import pyarrow.parquet as pq
        self._schema = arrow_schema()
        self._writer = pq.ParquetWriter(fh, self._schema, compression="snappy")
        self._rows = []

    def write(self, record):
        if self._writer is None:
            raise RuntimeError("write after flush: a Parquet file cannot be reopened")
        self._rows.append(record)
        if len(self._rows) >= self._batch_rows:
            self._write_rows()

    def _write_rows(self):
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def flush(self):
        # WriteToFiles calls flush once, right before closing the file: the footer must be written here.
        if self._writer is not None:
            self._write_rows()
            self._writer.close()
            self._writer = None


def _partition_file_naming(window_, pane, shard_index, total_shards, compression, destination):
    if window_ == window.GlobalWindow():
        return f"{destination}/features-{shard_index:05d}-of-{total_shards:05d}.parquet"
    # Windowed (streaming) writes: WriteToFiles names files by destination and window only, so a late pane
    # of the same window would overwrite the earlier file; a random token keeps every pane's file.
    start, end = window_.start.micros // 1000, window_.end.micros // 1000
    return (f"{destination}/features-{start}-{end}-{uuid.uuid4().hex[:12]}-"
            f"{shard_index:05d}-of-{total_shards:05d}.parquet")


class _CheckWrittenFn(beam.DoFn):
    def __init__(self, output_dir: str):
        self._dir = output_dir
        self._files = Metrics.counter(METRICS_NS, "parquet_files")

    def process(self, result):
        path = FileSystems.join(self._dir, result.file_name)
        if not FileSystems.exists(path):
            raise IOError(f"feature file {path} was not written (WriteToFiles could not move its temp file)")
        self._files.inc()
        yield path


class WriteOfflineFeatures(beam.PTransform):
    """Feature rows -> Parquet under `<output_dir>/date=YYYY-MM-DD/` (UTC date of window_end).

    Returns the written file paths. Batch: rows in the global window, files written once at the end.
    Streaming: pass `streaming_window` (seconds) to write files per fixed window of the rows' timestamps
    (window_end - 1 ms), and `allowed_lateness` at least ComputeFeatures' own, or late panes are dropped here.
    """

    def __init__(self, output_dir: str, streaming_window: Optional[float] = None, allowed_lateness: float = 0.0,
                 shards: Optional[int] = None):
        super().__init__()
        if not output_dir:
            raise ValueError("output_dir is required")
        if streaming_window is not None and streaming_window <= 0:
            raise ValueError(f"streaming_window must be > 0, got {streaming_window}")
        self._dir = output_dir
        self._streaming_window = streaming_window
        self._lateness = allowed_lateness
        self._shards = shards

    def expand(self, rows):
        if self._streaming_window is not None:
            rows = rows | "WriteWindows" >> beam.WindowInto(
                window.FixedWindows(self._streaming_window), allowed_lateness=self._lateness)
        out_dir = self._dir
        written = rows | "WriteParquet" >> fileio.WriteToFiles(
            path=out_dir, destination=partition_of, sink=lambda _dest: _ParquetSink(out_dir),
            file_naming=_partition_file_naming, shards=self._shards)
        return written | "CheckWritten" >> beam.ParDo(_CheckWrittenFn(out_dir))
