"""Deduplication by idempotency key (event_id) over an event-time horizon.

Why not Beam's `DeduplicatePerKey`: it drops duplicates with no output (we must count and write
them), and its horizon is enforced only by its expiry timer, which in batch fires after all input
(so batch would deduplicate across all time while streaming forgets after the horizon). Here the
decision compares event times, so batch and streaming classify alike; the timer only frees state.
Timer and state names carry a `dedupe_` prefix: timer names must be unique across a pipeline on
FnApiRunner (see shared/BEAM-NOTES.md), and this DoFn must not clash with other stateful steps.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms import contract
from transforms.records import RecordPacker

METRICS_NS = "feedback.dedupe"


def is_duplicate(first_time_ms: int | None, event_time_ms: int, horizon_ms: int) -> bool:
    """A copy is a duplicate when a kept copy of its event_id lies within the horizon in event time."""
    return first_time_ms is not None and abs(event_time_ms - first_time_ms) <= horizon_ms


def split_copies(copies: list[dict], horizon_ms: int) -> tuple[list[dict], list[dict]]:
    """All copies of one event_id -> (kept, duplicates), deciding exactly as `_DedupeFn` does when the
    copies arrive in event-time order (then arrival order; ties broken by content, so the choice is
    deterministic)."""
    if len(copies) == 1:  # ~97% of event_ids: nothing to order (the sort key costs a repr of the record)
        return list(copies), []
    kept, dups, kept_time = [], [], None
    # Earliest-arriving copy first, as streaming sees them (then content, for a deterministic tie-break).
    for e in sorted(copies, key=lambda e: (e["event_time"], e.get("arrival_time") or 0, repr(sorted(e.items())))):
        if is_duplicate(kept_time, e["event_time"], horizon_ms):
            dups.append(e)
        else:
            kept.append(e)
            kept_time = e["event_time"]
    return kept, dups


def duplicate_stub(event: dict) -> dict:
    return {"event_id": event["event_id"], "event_type": event["event_type"], "event_time": event["event_time"]}


class _DedupeFn(beam.DoFn):
    KEPT_TIME = ReadModifyWriteStateSpec("dedupe_kept_time", VarIntCoder())
    EXPIRY = TimerSpec("dedupe_expiry", TimeDomain.WATERMARK)

    def __init__(self, horizon_s: float, gc_delay_s: float):
        self._horizon_ms = int(horizon_s * 1000)
        self._gc_delay = Duration(seconds=horizon_s + gc_delay_s)
        self._dups = Metrics.counter(METRICS_NS, "duplicates")

    def process(
        self,
        element,
        kept=beam.DoFn.StateParam(KEPT_TIME),
        expiry=beam.DoFn.TimerParam(EXPIRY),
        timestamp=beam.DoFn.TimestampParam,
    ):
        _, event = element
        t = event["event_time"]
        if is_duplicate(kept.read(), t, self._horizon_ms):
            self._dups.inc()
            yield beam.pvalue.TaggedOutput(DedupeEvents.DUPLICATES, duplicate_stub(event))
            return
        kept.write(t)
        # Keep the state until no copy within the horizon can still arrive on time.
        expiry.set(Timestamp(micros=t * 1000) + self._gc_delay)
        yield event

    @on_timer(EXPIRY)
    def _expire(self, kept=beam.DoFn.StateParam(KEPT_TIME)):
        kept.clear()


class _SplitCopiesFn(beam.DoFn):
    """(event_id, copies) -> kept copies (main) and duplicate stubs (DUPLICATES). `packer`: the copies
    come packed by it (the bounded graph's GroupByKey); None: as dicts. `emit_packed`: kept copies
    leave packed (a lone copy as the bytes it came as, not unpacked here)."""

    def __init__(self, horizon_s: float, packer: RecordPacker | None = None, emit_packed: bool = False):
        if emit_packed and packer is None:
            raise ValueError("emit_packed needs the packer the copies come packed by")
        self._horizon_ms = int(horizon_s * 1000)
        self._packer = packer
        self._emit_packed = emit_packed
        self._dups = Metrics.counter(METRICS_NS, "duplicates")

    def process(self, keyed_copies):
        _, copies = keyed_copies
        if self._emit_packed:
            copies = list(copies)
            if len(copies) == 1:  # ~97% of event ids
                yield copies[0]
                return
        if self._packer is not None:
            copies = self._packer.unpacked(copies)
        kept, dups = split_copies(list(copies), self._horizon_ms)
        if self._emit_packed:
            kept = map(self._packer.pack, kept)
        # Not re-stamped: the bounded graph has no event-time windows, and a TimestampedValue costs a
        # window assignment per element.
        yield from kept
        if dups:
            self._dups.inc(len(dups))
        for e in dups:
            yield beam.pvalue.TaggedOutput(DedupeEvents.DUPLICATES, duplicate_stub(e))


class DedupeEvents(beam.PTransform):
    """Bounded events -> first copy of each event_id (main) and the extra copies (tag DUPLICATES).

    A GroupByKey over every copy of a key and the decision `is_duplicate` over them: on FnApiRunner,
    per-key user state ran at ~300 keys/s against ~10k/s for the grouping (benchmarks/RESULTS.md),
    and with bounded input every copy is known before anything is emitted anyway. Unbounded input
    uses DedupeEventsStreaming: the same decision, made as copies arrive.

    Args:
      horizon_s: a copy is a duplicate when a kept copy lies within this much event time.
      packer: packs the events through the GroupByKey (RecordPacker); default: every event as a whole dict.
      chunked: the input holds lists of events (EnrichEvents(chunked=True)); keying takes them apart.
      emit_packed: the kept events leave packed by `packer` (bytes; FilterBots takes them so), not as
        dicts: an event with one copy leaves as the bytes it was grouped with.
    """

    DUPLICATES = "duplicates"

    def __init__(
        self, horizon_s: float, packer: RecordPacker | None = None, chunked: bool = False, emit_packed: bool = False
    ):
        super().__init__()
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self._horizon_s = horizon_s
        self._packer = packer or RecordPacker()
        self._chunked = chunked
        self._emit_packed = emit_packed

    def _keyed(self, events):
        return events | "KeyByEventId" >> beam.Map(lambda e: (e["event_id"], e)).with_output_types(tuple[str, dict])

    def expand(self, events):
        pack = self._packer.pack
        if self._chunked:
            keyed = beam.FlatMap(lambda chunk: [(e["event_id"], pack(e)) for e in chunk])
        else:
            keyed = beam.Map(lambda e: (e["event_id"], pack(e)))
        return (
            events
            | "KeyByEventId" >> keyed.with_output_types(tuple[str, bytes])
            | "GroupCopies" >> beam.GroupByKey()
            | "SplitCopies"
            >> beam.ParDo(_SplitCopiesFn(self._horizon_s, self._packer, self._emit_packed)).with_outputs(
                self.DUPLICATES, main=contract.TAG_EVENTS
            )
        )


class DedupeEventsStreaming(DedupeEvents):
    """Unbounded events -> the same split as DedupeEvents, decided by a stateful DoFn as copies arrive.

    Args:
      horizon_s: as for DedupeEvents.
      allowed_lateness_s: how far behind the watermark copies can arrive (state is kept that long).
    """

    def __init__(self, horizon_s: float, allowed_lateness_s: float = 0.0):
        super().__init__(horizon_s)
        self._lateness_s = allowed_lateness_s

    def expand(self, events):
        return self._keyed(events) | "DropRepeats" >> beam.ParDo(
            _DedupeFn(self._horizon_s, self._lateness_s)
        ).with_outputs(self.DUPLICATES, main=contract.TAG_EVENTS)
