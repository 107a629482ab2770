"""Accounting: every input record ends in exactly one outcome, and the job proves it.

`CountOutcomes` counts the input and each outcome (with dead letters by reason and bots by rule)
inside the pipeline, so the figures come from the data written, not from metrics a runner may
report only approximately. `check_identity` is the pure check the launcher applies afterwards.
"""
from __future__ import annotations

from typing import Callable, Optional

import apache_beam as beam

from transforms import contract

INPUT = "input"


def _keys_for(outcome: str, detail: Optional[Callable[[dict], str]]):
    def keys(record):
        yield outcome
        if detail is not None:
            yield f"{outcome}.{detail(record)}"
    return keys


class CountOutcomes(beam.PTransform):
    """{name: PCollection} -> PCollection of (counter name, count).

    `breakdowns` maps an outcome name to a function giving a record's sub-key (e.g. its reason code).
    """

    def __init__(self, breakdowns: Optional[dict] = None, windowing=None):
        super().__init__()
        self._breakdowns = breakdowns or {}
        self._windowing = windowing

    def expand(self, named: dict):
        keyed = [pc | f"Key{name.title().replace('_', '')}" >> beam.FlatMap(_keys_for(name, self._breakdowns.get(name)))
                 for name, pc in sorted(named.items())]
        counters = keyed | "AllCounters" >> beam.Flatten()
        if self._windowing is not None:
            counters = counters | self._windowing
        return counters | "Count" >> beam.combiners.Count.PerElement()


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
    exposures = counters.get("exposures", 0)
    labels = counters.get("labels", 0)
    return {
        "exposures": exposures,
        "labels": labels,
        "positives": counters.get("labels.positive", 0),
        "negatives": counters.get("labels.negative", 0),
        "orphan_outcomes": counters.get("orphans", 0),
        "late_outcomes": counters.get("late_outcomes", 0),
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
