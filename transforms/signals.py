"""Signal-quality statistics, computed inside the pipeline from the very outputs it writes.

`QualitySignals` turns the graph's outputs into flat (counter, count) pairs -- hourly volumes,
latency and feature histograms on fixed bin edges, CTR by position, categorical frequencies -- plus
per-hour diversity rows and per-cohort freshness rows. `stats_from_parts` folds them into the quality
stats dict that `transforms/quality.py` turns into SLIs, drift, SLO verdicts and the HTML report.
Fixed bin edges make a run comparable with a baseline taken from another run.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.transforms import window

from transforms import contract
from transforms.accounting import Count, Fold, Tallies
from transforms.labels import is_exposure
from transforms.quality import entropy_bits

HOUR_MS = 3_600_000

# Upper bounds of histogram buckets (the last bucket is "more than the last edge").
LATENCY_EDGES_MS = (
    100,
    250,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
    7_200_000,
    21_600_000,
)
NUMERIC_EDGES = {
    "dwell_ms": (500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 120_000, 300_000, 600_000),
    "position": tuple(range(1, 21)) + (25, 30, 40, 50, 100),
    "propensity": tuple(round(x * 0.05, 2) for x in range(1, 20)),
    "value": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 5_000),
}
CATEGORICAL = ("event_type", "device_class", "browser", "os", "item_category", "policy")
NEW_USER_WINDOW_MS = 24 * HOUR_MS


def bucket_index(edges, value) -> int:
    """Index of the bucket of `value`: 0 .. len(edges) (the last is overflow)."""
    return bisect.bisect_left(edges, value)


def hour_of(ms: int) -> str:
    return _hour_label(ms // HOUR_MS)


@functools.lru_cache(maxsize=65_536)
def _hour_label(hour: int) -> str:
    # Formatting a datetime cost ~4 µs per call, several calls per event; a run spans few hours.
    return dt.datetime.fromtimestamp(hour * HOUR_MS / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:00:00Z")


# Counter keys, formatted once: an event contributes about a dozen, and an f-string per key cost more
# than the rest of the tally.
_LATENCY_KEYS = tuple(f"latency.{i}" for i in range(len(LATENCY_EDGES_MS) + 1))
_NUMERIC_KEYS = tuple(
    (name, edges, tuple(f"num.{name}.{i}" for i in range(len(edges) + 1))) for name, edges in NUMERIC_EDGES.items()
)
_CATEGORICAL_PLAIN = tuple(name for name in CATEGORICAL if name != "item_category")


@functools.lru_cache(maxsize=65_536)
def _hourly_key(hour: int, outcome: str) -> str:
    return f"hourly.{_hour_label(hour)}.{outcome}"


@functools.lru_cache(maxsize=65_536)
def _categorical_key(name: str, value: str) -> str:
    return f"cat.{name}.{value}"


def event_counters(e: dict, outcome: str) -> list[str]:
    """Counter keys one event contributes (valid and bot events carry the full record)."""
    hour = e["event_time"] // HOUR_MS
    keys = [_hourly_key(hour, outcome)]
    if outcome != contract.OUTCOME_VALID:
        return keys
    get = e.get
    if get("arrival_time") is not None:
        keys.append(_LATENCY_KEYS[bisect.bisect_left(LATENCY_EDGES_MS, e["arrival_time"] - e["event_time"])])
        keys.append("latency_known")
    for name, edges, numeric_keys in _NUMERIC_KEYS:
        v = get(name)
        if v is not None:
            keys.append(numeric_keys[bisect.bisect_left(edges, v)])
    for name in _CATEGORICAL_PLAIN:
        v = get(name)
        if v is not None:
            keys.append(_categorical_key(name, v if type(v) is str else str(v)))
    category = (get("item_meta") or {}).get("category")
    if category is not None:
        keys.append(_categorical_key("item_category", category if type(category) is str else str(category)))
    if is_exposure(e):
        keys.append(_hourly_key(hour, "exposures"))
    return keys


def too_late_counters(dead: dict) -> Iterable[str]:
    yield f"hourly.{hour_of(dead['event_time'])}.too_late"


def exposure_items(e: dict) -> Iterable[tuple]:
    """(hour, "exposure", item) of an exposure; nothing for other events."""
    if is_exposure(e):
        yield hour_of(e["event_time"]), "exposure", e["item_id"]


def positive_items(label: dict) -> Iterable[tuple]:
    if label["label"] == 1:
        yield hour_of(label["impression_time"]), "positive", label["item_id"]


def label_counters(label: dict) -> Iterable[str]:
    pos = label.get("position")
    key = "none" if pos is None else str(pos)
    yield f"position.{key}.exposures"
    if label["label"]:
        yield f"position.{key}.positives"
        yield f"hourly.{hour_of(label['impression_time'])}.positives"


class _HourlyDiversityFn(beam.DoFn):
    def process(self, hour_and_counts):
        hour, pairs = hour_and_counts
        by_kind: dict[str, list[int]] = {"exposure": [], "positive": []}
        for kind, n in pairs:
            by_kind[kind].append(n)
        yield {
            "hour": hour,
            "exposure_items": len(by_kind["exposure"]),
            "exposure_entropy": entropy_bits(by_kind["exposure"]),
            "positive_items": len(by_kind["positive"]),
            "positive_entropy": entropy_bits(by_kind["positive"]),
        }


class _MinMax(beam.CombineFn):
    def create_accumulator(self):
        return None

    def add_input(self, acc, pair):
        return pair if acc is None else (min(acc[0], pair[0]), max(acc[1], pair[1]))

    def merge_accumulators(self, accs):
        acc = None
        for a in accs:
            if a is not None:
                acc = a if acc is None else (min(acc[0], a[0]), max(acc[1], a[1]))
        return acc

    def extract_output(self, acc):
        return acc


def add_first_last(users: dict, e: dict) -> None:
    """Folds a valid event into {user: (first, last event time)} (a bundle's partials)."""
    t, user = e["event_time"], e["user_id"]
    seen = users.get(user)
    if seen is None:
        users[user] = (t, t)
    elif t < seen[0] or t > seen[1]:
        users[user] = (min(seen[0], t), max(seen[1], t))


class QualitySignals(beam.PTransform):
    """GraphOutputs -> {"counters": (key, n), "diversity": rows, "freshness": rows} (bounded input, in
    the global window: partial results are emitted per bundle there).

    What it tallies is declared in TALLIES (sources named as GraphOutputs fields). A job passes them
    to `build_event_graph(tallies=...)`, which takes them in the per-bundle step it counts the
    outcomes with (one DoFn per collection), and gives their outputs here as `tallies`; without
    `tallies` the signals apply their plan themselves (`Tallies`).
    """

    COUNTERS, HOUR_ITEMS, USER_FIRST_LAST = "signals.counters", "signals.hour_items", "signals.user_first_last"
    TALLIES = (
        Count("valid", COUNTERS, functools.partial(event_counters, outcome=contract.OUTCOME_VALID)),
        Count("bots", COUNTERS, functools.partial(event_counters, outcome=contract.OUTCOME_BOT)),
        Count("too_late", COUNTERS, too_late_counters),
        Count("labels", COUNTERS, label_counters),
        # (hour, kind, item) -> n: the items' diversity per hour.
        Count("valid", HOUR_ITEMS, exposure_items),
        Count("labels", HOUR_ITEMS, positive_items),
        # user -> (first, last event time): freshness per cohort.
        Fold("valid", USER_FIRST_LAST, add_first_last, _MinMax()),
    )

    def __init__(self, outputs, tallies: dict | None = None):
        super().__init__()
        self._out, self._tallies = outputs, tallies

    def expand(self, pbegin):
        out, tallies = self._out, self._tallies
        if not isinstance(out.valid.windowing.windowfn, window.GlobalWindows):
            raise ValueError("QualitySignals needs its inputs in the global window (bounded input)")
        if tallies is None:
            sources = {line.source: getattr(out, line.source) for line in self.TALLIES}
            tallies = sources | "Tallies" >> Tallies(self.TALLIES)
        diversity = (
            tallies[self.HOUR_ITEMS]
            | "ByHour" >> beam.MapTuple(lambda hk, n: (hk[0], (hk[1], n)))
            | "GroupHour" >> beam.GroupByKey()
            | "Diversity" >> beam.ParDo(_HourlyDiversityFn())
        )
        # Freshness per cohort: a user is "new" when first seen within a day of the run's end.
        freshness = (
            tallies[self.USER_FIRST_LAST]
            | "UserFirstLast" >> beam.Values()
            | "AllUsers" >> beam.combiners.ToList()
            | "Cohorts" >> beam.FlatMap(freshness_rows)
        )
        return {"counters": tallies[self.COUNTERS], "diversity": diversity, "freshness": freshness}


def freshness_rows(first_last: list) -> Iterable[dict]:
    """[(first, last) per user] -> one row per cohort with its latest event time and user count."""
    if not first_last:
        return
    run_end = max(last for _, last in first_last)
    cohorts: dict[str, dict] = {}
    for first, last in first_last:
        cohort = "new" if run_end - first <= NEW_USER_WINDOW_MS else "returning"
        c = cohorts.setdefault(cohort, {"cohort": cohort, "latest_event_time_ms": last, "users": 0})
        c["latest_event_time_ms"] = max(c["latest_event_time_ms"], last)
        c["users"] += 1
    for c in cohorts.values():
        yield {**c, "run_end_ms": run_end}


def _histogram(counters: dict, prefix: str, edges) -> dict:
    counts = [0] * (len(edges) + 1)
    for i in range(len(counts)):
        counts[i] = counters.get(f"{prefix}.{i}", 0)
    return {"edges": list(edges), "counts": counts}


def _split_counters(counters: dict) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """The hourly, per-position CTR and categorical counter groups, keyed as their counter names say."""
    hourly: dict[str, dict] = {}
    ctr: dict[str, dict] = {}
    categorical: dict[str, dict] = {}
    for key, n in counters.items():
        head, _, rest = key.partition(".")
        if head == "hourly":
            hour, _, what = rest.rpartition(".")
            hourly.setdefault(
                hour, {k: 0 for k in ("input", "valid", "bots", "dead_letter", "too_late", "exposures", "positives")}
            )[what] = n
        elif head == "position":
            pos, _, what = rest.rpartition(".")
            ctr.setdefault(pos, {"exposures": 0, "positives": 0})[what] = n
        elif head == "cat":
            name, _, value = rest.partition(".")
            categorical.setdefault(name, {})[value] = n
    return hourly, ctr, categorical


def _freshness_by_cohort(freshness: list[dict]) -> tuple[dict[str, dict], int | None]:
    """Per-cohort freshness and the run's end time (None without freshness rows)."""
    fresh = {
        "new": {"latest_event_time_ms": None, "events": 0},
        "returning": {"latest_event_time_ms": None, "events": 0},
    }
    run_end = None
    for row in freshness:
        fresh[row["cohort"]] = {"latest_event_time_ms": row["latest_event_time_ms"], "events": row["users"]}
        run_end = row["run_end_ms"]
    return fresh, run_end


def _complete_hours(diversity: list[dict], run_end: int | None) -> list[dict]:
    """Diversity rows sorted by hour, without the last hour if the run ended before it was complete."""
    diversity = sorted(diversity, key=lambda r: r["hour"])
    # The hour the data ends in is usually cut short: its few events look like a diversity collapse.
    # Trends use complete hours only.
    if diversity and run_end is not None:
        last_start = int(
            dt.datetime.strptime(diversity[-1]["hour"], "%Y-%m-%dT%H:00:00Z")
            .replace(tzinfo=dt.timezone.utc)
            .timestamp()
            * 1000
        )
        if run_end < last_start + HOUR_MS - 60_000:
            diversity = diversity[:-1]
    return diversity


def stats_from_parts(summary: dict, counters: dict, diversity: list[dict], freshness: list[dict]) -> dict:
    """The quality stats dict (see transforms/quality.py) from the run summary and signal parts."""
    hourly, ctr, categorical = _split_counters(counters)
    fresh, run_end = _freshness_by_cohort(freshness)
    diversity = _complete_hours(diversity, run_end)
    return {
        "counts": summary["counts"],
        "input_records": summary["accounting"]["input_records"],
        "dead_letter_by_reason": summary["dead_letter_by_reason"],
        "bots_by_rule": summary["bots_by_rule"],
        "labels": summary["labels"],
        "hourly": dict(sorted(hourly.items())),
        "latency_ms": {"arrival_minus_event": _histogram(counters, "latency", LATENCY_EDGES_MS)},
        "ctr_by_position": dict(
            sorted(ctr.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0))
        ),
        "diversity": {
            row["hour"]: {
                k: row[k] for k in ("exposure_items", "exposure_entropy", "positive_items", "positive_entropy")
            }
            for row in diversity
        },
        "freshness": fresh,
        "distributions": {
            "numeric": {name: _histogram(counters, f"num.{name}", edges) for name, edges in NUMERIC_EDGES.items()},
            "categorical": {name: dict(sorted(categorical.get(name, {}).items())) for name in CATEGORICAL},
        },
        "run_end_ms": run_end,
    }
