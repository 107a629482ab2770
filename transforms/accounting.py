"""Accounting: every input record ends in exactly one outcome, and the job proves it.

`CountOutcomes` counts the input and each outcome (with dead letters by reason and bots by rule)
inside the pipeline, so the figures come from the data written, not from metrics a runner may
report only approximately. `check_identity` is the pure check the launcher applies afterwards.

`count_keys` is the counting itself: each record's counter keys are tallied per bundle inside one
DoFn and only the bundle's partial counts leave it, then summed per key. Emitting one
element per key and record instead (`Count.PerElement`) cost Beam's per-element work ~15 times per
event between accounting and quality signals (benchmarks/RESULTS.md). `Tallies` goes one step
further for bounded jobs: a tally plan (`Count` and `Fold` lines) declares what each collection is
tallied under, and each collection is read by ONE per-bundle DoFn whatever the number of lines and
outputs taken from it (the accounting's and the quality signals' alike).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
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


@dataclasses.dataclass(frozen=True)
class Count:
    """A tally plan line: each record of the collection named `source` is counted under its keys,
    `keys(record)` (a tuple counts fastest); `output` holds (key, count)."""

    source: str
    output: str | None
    keys: Callable[[object], Iterable]
    combine = sum  # not a field: counts are summed


@dataclasses.dataclass(frozen=True)
class Fold:
    """A tally plan line: each record of the collection named `source` updates a dict of partial values
    per key, `add(partials, record)`; `output` holds (key, value), the bundles' partials merged by
    `combine` (a CombineFn or callable, as `CombinePerKey` takes it)."""

    source: str
    output: str | None
    add: Callable[[dict, object], None]
    combine: object


class _TallyPerBundleFn(beam.DoFn):
    """One collection's records (global window) -> every tally plan line taken from it: (key, partial)
    per key, output and bundle, emitted when the bundle ends, tagged with its output (untagged: output
    None). One DoFn however many lines: each consumer of a collection costs Beam's per-element work
    (~0.5-1 µs on FnApiRunner). No WindowParam: a DoFn asking for its window takes Beam's slower
    per-window invocation path (~2x the per-element cost on FnApiRunner); global-window inputs only."""

    def __init__(self, lines: tuple):
        self._lines = tuple(lines)
        self._partials: dict = {}

    def start_bundle(self):
        partials = self._partials = {}
        counts, folds = [], []
        for line in self._lines:
            if isinstance(line, Count):
                counts.append((partials.setdefault(line.output, collections.Counter()).update, line.keys))
            else:
                folds.append((line.add, partials.setdefault(line.output, {})))
        self._counts, self._folds = tuple(counts), tuple(folds)

    def process(self, record):
        for update, keys in self._counts:
            update(keys(record))
        for add, partials in self._folds:
            add(partials, record)

    def finish_bundle(self):
        end, windows = GlobalWindow().max_timestamp(), (GlobalWindow(),)
        for output, partials in self._partials.items():
            for pair in partials.items():
                value = WindowedValue(pair, end, windows)
                yield value if output is None else TaggedOutput(output, value)
        self._partials = {}


def in_global_window(*pcolls) -> bool:
    return all(isinstance(pc.windowing.windowfn, GlobalWindows) for pc in pcolls)


def _title(name: str) -> str:
    return name.title().replace("_", "").replace(".", "")


class Tallies(beam.PTransform):
    """{source name: PCollection} -> {output: PCollection of (key, value)}: every line (`Count`, `Fold`)
    of a tally plan.

    Each source collection is read by ONE per-bundle DoFn (`Tally<Source>`) applying all the plan's
    lines taken from it; each output is the Flatten (`All<Output>`) of its partials, summed or merged
    per key (`Sum<Output>`). Bounded inputs in the global window only (`in_global_window`): there a
    bundle's records all belong to the one window and pane.
    """

    def __init__(self, plan: Iterable):
        super().__init__()
        self._plan = tuple(plan)
        if not self._plan:
            raise ValueError("a tally plan needs at least one line")
        combines: dict = {}
        for line in self._plan:
            if not line.output:
                raise ValueError(f"tally plan line {line}: name its output")
            if combines.setdefault(line.output, line.combine) is not line.combine:
                raise ValueError(f"tally plan output {line.output!r}: its lines combine partials differently")
        self._combines = combines

    def expand(self, sources: dict):
        missing = sorted({line.source for line in self._plan} - set(sources))
        if missing:
            raise ValueError(f"tally plan sources missing from the input: {missing}")
        if not in_global_window(*sources.values()):
            raise ValueError("Tallies needs its inputs in the global window (bounded input)")
        partials: dict[str, list] = {output: [] for output in self._combines}
        for source in sorted({line.source for line in self._plan}):
            lines = tuple(line for line in self._plan if line.source == source)
            outputs = sorted({line.output for line in lines})
            tallied = sources[source] | f"Tally{_title(source)}" >> beam.ParDo(_TallyPerBundleFn(lines)).with_outputs(
                *outputs
            )
            for output in outputs:
                partials[output].append(tallied[output])
        return {
            output: partials[output]
            | f"All{_title(output)}" >> beam.Flatten()
            | f"Sum{_title(output)}" >> beam.CombinePerKey(self._combines[output])
            for output in sorted(partials)
        }


def count_keys(sources: dict, windowing=None):
    """{label: (PCollection, keys function)} -> PCollection of (key, count): how often each key was
    yielded, over all records of all the collections, per window. Call it inside a composite's
    `expand` (its steps are labelled there).

    For inputs whose panes are decided by a trigger (streaming), pass `windowing`: it is applied to
    each record's keys before counting, so each pane counts its own records. Such inputs, and inputs
    in any window but the global one, are counted per element (`Count.PerElement`): one bundle's
    records may belong to different windows and panes.
    """
    per_bundle = windowing is None and in_global_window(*(pc for pc, _ in sources.values()))
    if not per_bundle:
        keyed = [pc | f"Key{label}" >> beam.FlatMap(keys) for label, (pc, keys) in sorted(sources.items())]
        counters = keyed | "AllCounters" >> beam.Flatten()
        if windowing is not None:
            counters = counters | windowing
        return counters | "Count" >> beam.combiners.Count.PerElement()
    partials = [
        pc | f"Tally{label}" >> beam.ParDo(_TallyPerBundleFn([Count(label, None, keys)]))
        for label, (pc, keys) in sorted(sources.items())
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
    `tally_plan` gives the same counters as tally plan lines, for a `Tallies` step shared with others.
    """

    def __init__(self, breakdowns: dict | None = None, windowing=None):
        super().__init__()
        self._breakdowns = breakdowns or {}
        self._windowing = windowing

    def tally_plan(self, sources: dict[str, str], output: str) -> tuple[Count, ...]:
        """{counter name: source name} -> one `Count` line per counter, under `output`."""
        return tuple(
            Count(source, output, _keys_for(name, self._breakdowns.get(name))) for name, source in sources.items()
        )

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
