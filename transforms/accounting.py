"""Accounting: every input record ends in exactly one outcome, and the job proves it.

`CountOutcomes` counts the input and each outcome (with dead letters by reason and bots by rule)
inside the pipeline, so the figures come from the data written, not from metrics a runner may
report only approximately. `check_identity` is the pure check the launcher applies afterwards.

`count_keys` is the counting itself: each record's counter keys are tallied per bundle inside one
DoFn and only the bundle's partial counts leave it, then summed per key. Emitting one
element per key and record instead (`Count.PerElement`) cost Beam's per-element work ~15 times per
event between accounting and quality signals (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from transforms import contract

INPUT = contract.COUNTER_INPUT


def _keys_for(outcome: str, detail: Callable[[dict], str] | None):
    # Tuples, not a generator: Counter.update counts a tuple in C.
    if detail is None:
        only = (outcome,)
        return lambda record: only
    return lambda record: (outcome, f"{outcome}.{detail(record)}")


class _CountKeysPerBundleFn(beam.DoFn):
    """Records of the global window -> (key, partial count) per key and bundle, emitted when the bundle
    ends. No WindowParam: a DoFn asking for its window takes Beam's slower per-window invocation path
    (~2x the per-element cost on FnApiRunner); `count_keys` uses this DoFn for global-window inputs only."""

    def __init__(self, keys: Callable[[object], Iterable]):
        self._keys = keys
        self._counts = collections.Counter()

    def start_bundle(self):
        self._counts = collections.Counter()

    def process(self, record):
        self._counts.update(self._keys(record))

    def finish_bundle(self):
        end = GlobalWindow().max_timestamp()
        for key, n in self._counts.items():
            yield WindowedValue((key, n), end, (GlobalWindow(),))
        self._counts = collections.Counter()


def count_keys(sources: dict, windowing=None):
    """{label: (PCollection, keys function)} -> PCollection of (key, count): how often each key was
    yielded, over all records of all the collections, per window. Call it inside a composite's
    `expand` (its steps are labelled there).

    For inputs whose panes are decided by a trigger (streaming), pass `windowing`: it is applied to
    each record's keys before counting, so each pane counts its own records. Such inputs, and inputs
    in any window but the global one, are counted per element (`Count.PerElement`): one bundle's
    records may belong to different windows and panes.
    """
    per_bundle = windowing is None and all(
        isinstance(pc.windowing.windowfn, GlobalWindows) for pc, _ in sources.values()
    )
    if not per_bundle:
        keyed = [pc | f"Key{label}" >> beam.FlatMap(keys) for label, (pc, keys) in sorted(sources.items())]
        counters = keyed | "AllCounters" >> beam.Flatten()
        if windowing is not None:
            counters = counters | windowing
        return counters | "Count" >> beam.combiners.Count.PerElement()
    partials = [
        pc | f"Tally{label}" >> beam.ParDo(_CountKeysPerBundleFn(keys)) for label, (pc, keys) in sorted(sources.items())
    ]
    return partials | "AllPartials" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)


class CountKeys(beam.PTransform):
    """`count_keys` as a composite step, applied to the pipeline: `p | "Count" >> CountKeys({...})`."""

    def __init__(self, sources: dict, windowing=None):
        super().__init__()
        if not sources:
            raise ValueError("sources must name at least one (PCollection, keys function)")
        self._sources, self._windowing = sources, windowing

    def expand(self, pbegin):
        return count_keys(self._sources, self._windowing)


class CountOutcomes(beam.PTransform):
    """{name: PCollection} -> PCollection of (counter name, count).

    `breakdowns` maps an outcome name to a function giving a record's sub-key (e.g. its reason code).
    """

    def __init__(self, breakdowns: dict | None = None, windowing=None):
        super().__init__()
        self._breakdowns = breakdowns or {}
        self._windowing = windowing

    def expand(self, named: dict):
        return count_keys(
            {
                name.title().replace("_", ""): (pc, _keys_for(name, self._breakdowns.get(name)))
                for name, pc in named.items()
            },
            self._windowing,
        )


def summarise(counters: dict) -> dict:
    """Flat counters -> {"counts": {outcome: n}, "<outcome>_by_<x>": {...}, "accounting": {...}}."""
    counts = {o: counters.get(o, 0) for o in contract.OUTCOMES}
    breakdown = {}
    for key, n in counters.items():
        if "." in key:
            outcome, sub = key.split(".", 1)
            breakdown.setdefault(outcome, {})[sub] = n
    return {
        "counts": counts,
        "dead_letter_by_reason": dict(sorted(breakdown.get(contract.OUTCOME_DEAD_LETTER, {}).items())),
        "bots_by_rule": dict(sorted(breakdown.get(contract.OUTCOME_BOT, {}).items())),
        "valid_by_event_type": dict(sorted(breakdown.get(contract.OUTCOME_VALID, {}).items())),
        "accounting": check_identity(counters.get(INPUT, 0), counts),
        "labels": label_summary(counters),
    }


def label_summary(counters: dict) -> dict:
    """Exposures are the valid impressions with an item; each must get exactly one label."""
    exposures = counters.get(contract.COUNTER_EXPOSURES, 0)
    labels = counters.get(contract.COUNTER_LABELS, 0)
    return {
        "exposures": exposures,
        "labels": labels,
        "positives": counters.get(contract.COUNTER_LABELS_POSITIVE, 0),
        "negatives": counters.get(contract.COUNTER_LABELS_NEGATIVE, 0),
        "orphan_outcomes": counters.get(contract.COUNTER_ORPHANS, 0),
        "late_outcomes": counters.get(contract.COUNTER_LATE_OUTCOMES, 0),
        "one_label_per_exposure": labels == exposures,
        "coverage": round(labels / exposures, 6) if exposures else None,
    }


def check_identity(input_records: int, counts: dict) -> dict:
    total = sum(counts[o] for o in contract.OUTCOMES)
    return {
        "input_records": input_records,
        "sum_of_outcomes": total,
        "identity": "input_records = " + " + ".join(contract.OUTCOMES),
        "holds": input_records == total,
        "difference": input_records - total,
    }


class AccountingError(RuntimeError):
    """The accounting identity does not hold: records were lost or counted twice."""
