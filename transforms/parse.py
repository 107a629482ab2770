"""Parse and validate raw events against their versioned schema.

Pure functions do the work (`decode_payload`, `validate_event`, `parse_record`); `ParseEvents` wraps
them in one DoFn with three outputs: valid events, consent-dropped stubs and dead letters. A record
never leaves this stage without landing in exactly one of them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import math
import sys
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

from transforms import contract
from transforms.deadletter import dead_letter
from transforms.privacy import PSEUDONYMISED_MARK, KeySource, PiiCounters, Redactor, mask_pii, protect_consent_stub
from transforms.schemas import SchemaRegistry, SchemaVersion

METRICS_NS = "feedback.parse"

# A raw record: (source, payload, arrival_ms). payload is the exact bytes of one JSON line or message,
# or a dict decoded from an Avro file (its schema_version filled in from the file's writer schema).
# arrival_ms is when the pipeline's front door received it (Pub/Sub publish time, an archive's
# recorded arrival time), or None when unknown (then nothing can be too late).
RawRecord = tuple[str, bytes | dict, int | None]


class RawChunk(list):
    """RawRecords travelling as one element: the bounded graph's stateless front (parse, privacy,
    enrichment) pays Beam's per-element cost once per chunk (`ParseEvents(chunked=True)`). A
    PCollection whose element type is RawChunk (`ReadRawRecords`) is parsed in chunks by
    `build_event_graph`."""

    __slots__ = ()


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ID_SUFFIX = "_id"


class Rejected(Exception):
    """A record that cannot become a valid event: reason code, offending field, readable message."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


class ConsentWithdrawn(Exception):
    """consent: false -- the event must not be stored, whatever else is in it."""

    def __init__(self, obj: dict):
        super().__init__("consent is false")
        self.obj = obj


@dataclasses.dataclass(frozen=True)
class ValidationRules:
    """Everything validation needs, resolved once on the launcher (picklable, no file access)."""

    registry: SchemaRegistry
    event_types: frozenset
    max_event_bytes: int
    min_event_time_ms: int
    max_event_time_ms: int
    default_version: int
    reject_unknown_fields: bool
    naive_as_utc: bool
    lateness_ms: int = 3_600_000
    arrival_field: str | None = None

    @classmethod
    def from_config(cls, cfg, registry: SchemaRegistry, job_start: dt.datetime) -> ValidationRules:
        v = cfg.validation
        min_ms = parse_event_time(v.min_event_time, naive_as_utc=False)
        max_ms = int((job_start.timestamp() + v.max_clock_skew) * 1000)
        if registry.get(cfg.schema.default_version) is None:
            from transforms.config import ConfigError

            raise ConfigError(
                f"schema.default_version: version {cfg.schema.default_version} has no event.v"
                f"{cfg.schema.default_version}.avsc; available: {list(registry.versions)}"
            )
        return cls(
            registry,
            frozenset(v.event_types),
            v.max_event_bytes,
            min_ms,
            max_ms,
            cfg.schema.default_version,
            cfg.schema.unknown_fields == "reject",
            v.naive_timestamps == "utc",
            int(cfg.time.lateness * 1000),
            cfg.time.arrival_field,
        )

    @functools.cached_property
    def latest_fields_as_none(self) -> dict:
        """{field: None} for the latest schema's fields, in its order: an older version's event is laid
        over it. Built once per worker (cached on the instance), not per record."""
        return dict.fromkeys(f.name for f in self.registry.latest.fields)


# --- pure functions ---------------------------------------------------------------------------


def parse_event_time(value: Any, naive_as_utc: bool) -> int:
    """ISO-8601 with offset, or epoch milliseconds (number or digit string) -> epoch ms.

    Raises ValueError with the reason in words.
    """
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, dt.datetime):  # from Avro timestamp-millis
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int((value - _EPOCH) // dt.timedelta(milliseconds=1))
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"epoch milliseconds must be a whole number, got {value!r}")
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.isdigit():
            return int(s)
        try:
            t = dt.datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"{value!r} is neither ISO-8601 nor epoch milliseconds") from None
        if t.tzinfo is None:
            if not naive_as_utc:
                raise ValueError(f"{value!r} has no UTC offset; add one (e.g. 'Z' or '+01:00')")
            t = t.replace(tzinfo=dt.timezone.utc)
        return int((t - _EPOCH) // dt.timedelta(milliseconds=1))
    raise ValueError(f"a {type(value).__name__} is not a time")


def decode_payload(raw: bytes, max_bytes: int) -> Any:
    """Exact bytes of one record -> a JSON value. Raises Rejected (ConsentWithdrawn for a consent: false
    object that is rejected only for a number beyond the double range)."""
    if len(raw) > max_bytes:
        raise Rejected(contract.OVERSIZE_PAYLOAD, None, f"record is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(
            contract.BAD_ENCODING, None, f"record is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        error = e
    else:
        if isinstance(obj, dict) and obj.get("consent") is not False and _consent_may_repeat(raw):
            if _any_consent_false(text):
                obj["consent"] = False  # a record that also says consent: false is withdrawn: fail closed
        return obj
    if not text.strip():  # tested after orjson failed: empty text never parses, and strip() copies
        raise Rejected(contract.MALFORMED_JSON, None, "record is empty")
    # orjson refuses numbers no double can hold (1e400); the standard library reads them (as inf, or an
    # int for a long digit string), which tells which field is out of range. Only for records orjson
    # rejected, so the slower parser never runs on good input.
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        obj = None
    field = None if obj is None else _number_beyond_double(obj)
    if field is None:
        raise Rejected(contract.MALFORMED_JSON, None, f"not valid JSON: {error}")
    if isinstance(obj, dict) and obj.get("consent") is False:
        raise ConsentWithdrawn(obj)  # consent first, whatever else is wrong (see validate_event)
    raise Rejected(
        contract.OUT_OF_RANGE, field, f"{field} is a number beyond the double range (|x| <= {_MAX_DOUBLE:.17g})"
    )


def _consent_may_repeat(raw: bytes) -> bool:
    """Cheap test for records where the parsed object may hide a `consent: false`: JSON keeps the last of
    repeated keys, and a key can be written with escapes (`"consen\\u0074"`)."""
    # b"\\" first: a one-byte search is a memchr, the two-byte one costs ~5x more on every record.
    return raw.count(b'"consent"') > 1 or (b"\\" in raw and b"\\u" in raw)


def _any_consent_false(text: str) -> bool:
    """Whether any top-level `consent` pair of a JSON object says false (all pairs, not the last one)."""
    try:
        pairs = json.loads(text, object_pairs_hook=lambda kv: kv)
    except (ValueError, RecursionError):
        return False
    return isinstance(pairs, list) and any(
        isinstance(kv, tuple) and kv[0] == "consent" and kv[1] is False for kv in pairs
    )


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _number_beyond_double(obj: Any) -> str | None:
    """The path of the first number in a decoded JSON value that no double can hold, or None."""
    stack = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, float) and not math.isfinite(value):
            return path or "(record)"
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_DOUBLE:
            return path or "(record)"
    return None


def _resolve_version(obj: dict, rules: ValidationRules) -> SchemaVersion:
    declared = obj.get("schema_version")
    if declared is None:
        version = rules.default_version
    elif isinstance(declared, int) and not isinstance(declared, bool):
        version = declared
    elif isinstance(declared, str) and declared.strip().lstrip("v").isdigit():
        version = int(declared.strip().lstrip("v"))
    else:
        raise Rejected(
            contract.WRONG_TYPE,
            "schema_version",
            f"schema_version must be an integer, got {type(declared).__name__} {declared!r}",
        )
    sv = rules.registry.get(version)
    if sv is None:
        raise Rejected(
            contract.SCHEMA_VIOLATION,
            "schema_version",
            f"schema_version {version} is not registered (known: {list(rules.registry.versions)})",
        )
    return sv


def _coerce(field, value: Any) -> Any:
    """Check one value against its field's Avro kind; returns the canonical value or raises Rejected."""
    kind, name = field.kind, field.name
    if kind == "string":
        if isinstance(value, str):
            return value
        # Numeric identifiers are common in real logs (user 48213); take them as their decimal text.
        if name.endswith(_ID_SUFFIX) and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise _wrong_type(name, value, "a string")
    if kind in ("int", "long"):
        if isinstance(value, bool):
            raise _wrong_type(name, value, "an integer")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise Rejected(contract.OUT_OF_RANGE, name, f"{name} must be a finite integer, got {value!r}")
            if not value.is_integer():
                raise _wrong_type(name, value, "an integer")
            value = int(value)
        if not isinstance(value, int):
            raise _wrong_type(name, value, "an integer")
        return _in_avro_range(name, kind, value)
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(name, value, "a number")
        try:
            number = float(value)
        except OverflowError:  # an int beyond the double range
            number = math.inf
        if not math.isfinite(number):
            raise Rejected(contract.OUT_OF_RANGE, name, f"{name} must be finite, got {_short(value)}")
        return _in_avro_range(name, kind, number)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _wrong_type(name, value, "true or false")
        return value
    if kind == "map":
        if not isinstance(value, dict):
            raise _wrong_type(name, value, "an object of strings")
        for k, v in value.items():
            if not isinstance(v, str):
                raise Rejected(
                    contract.WRONG_TYPE,
                    f"{name}.{k}",
                    f"{name}.{k} must be a string, got {type(v).__name__} {_short(v)}",
                )
        return dict(value)
    return value  # timestamp: handled by the caller


def _wrong_type(name: str, value: Any, expected: str) -> Rejected:
    return Rejected(contract.WRONG_TYPE, name, f"{name} must be {expected}, got {type(value).__name__} {_short(value)}")


# What each Avro type can hold: a value outside it would pass validation and then fail the sink's
# writer (and the job). Every sink of the job writes these fields with these types (events/bots,
# labels, slates Avro; Parquet int32/int64/float64 and JSON lines hold at least as much).
_MAX_DOUBLE = sys.float_info.max
_AVRO_RANGES = {
    "int": (-(2**31), 2**31 - 1),
    "long": (-(2**63), 2**63 - 1),
    "float": (-3.4028234663852886e38, 3.4028234663852886e38),
    "double": (-_MAX_DOUBLE, _MAX_DOUBLE),
}


def _in_avro_range(name: str, kind: str, value):
    low, high = _AVRO_RANGES[kind]
    if not low <= value <= high:
        raise Rejected(
            contract.OUT_OF_RANGE,
            name,
            f"{name} {_short(value)} is outside the range of Avro {kind} [{low:.17g}, {high:.17g}]"
            if kind in ("float", "double")
            else f"{name} {_short(value)} is outside the range of Avro {kind} [{low}, {high}]",
        )
    return value


def _short(value: Any, limit: int = 60) -> str:
    """A value quoted in a dead-letter message: PII masked before the cut (a cut address or number is
    no longer recognised as one, and its first part would stay)."""
    text = repr(value)
    if len(text) <= limit:
        return text  # the dead letter's message scrub redacts it whole
    text = mask_pii(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _reject_unknown_fields(obj: dict, sv: SchemaVersion) -> None:
    """Rejects a record with fields its schema version does not have, naming the first few."""
    if obj.keys() <= sv.field_names:  # the common case, one set comparison
        return
    unknown = sorted(k for k in obj if k not in sv.field_names)
    if unknown:
        raise Rejected(
            contract.SCHEMA_VIOLATION,
            unknown[0],
            f"field {unknown[0]!r} is not in schema version {sv.version}"
            + (f" (also: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""),
        )


def _event_time_ms(name: str, value: Any, rules: ValidationRules) -> int:
    """A timestamp field's value -> epoch milliseconds within the plausible range, or Rejected."""
    try:
        ms = parse_event_time(value, rules.naive_as_utc)
    except ValueError as e:
        raise Rejected(contract.BAD_TIMESTAMP, name, f"{name}: {e}") from None
    if ms < rules.min_event_time_ms:
        hint = " (epoch seconds instead of milliseconds?)" if 0 <= ms < 10_000_000_000 else ""
        raise Rejected(
            contract.BAD_TIMESTAMP,
            name,
            f"{name} {_short(value)} is {_iso(ms)}, before the earliest plausible time "
            f"{_iso(rules.min_event_time_ms)} (validation.min_event_time){hint}",
        )
    if ms > rules.max_event_time_ms:
        # No job-start time in the message: a replay must write the same dead letter.
        raise Rejected(
            contract.BAD_TIMESTAMP,
            name,
            f"{name} {_short(value)} is {_iso(ms)}, further in the future than validation.max_clock_skew allows",
        )
    return ms


def validate_event(obj: Any, rules: ValidationRules) -> dict:
    """A decoded record -> the canonical event dict. Raises Rejected or ConsentWithdrawn.

    Consent is honoured first: an object saying consent: false is never stored, not even as a
    dead letter, whatever else is wrong with it.
    """
    if not isinstance(obj, dict):
        raise Rejected(contract.NOT_AN_OBJECT, None, f"record must be a JSON object, got {type(obj).__name__}")
    if obj.get("consent") is False:
        raise ConsentWithdrawn(obj)
    sv = _resolve_version(obj, rules)
    if rules.reject_unknown_fields:
        _reject_unknown_fields(obj, sv)
    event = {}
    for field in sv.fields:
        name = field.name
        value = obj.get(name)
        if value is None or (field.required and value == ""):
            if field.required:
                raise Rejected(contract.MISSING_FIELD, name, f"required field {name!r} is missing or empty")
            event[name] = None
        elif field.kind == "string" and type(value) is str:  # most fields: no call for what _coerce returns as is
            event[name] = value
        elif field.kind == "timestamp":
            event[name] = _event_time_ms(name, value, rules)
        else:
            event[name] = _coerce(field, value)
    if event["event_type"] not in rules.event_types:
        raise Rejected(
            contract.UNKNOWN_EVENT_TYPE,
            "event_type",
            f"event_type {event['event_type']!r} is not one of {sorted(rules.event_types)}",
        )
    _check_ranges(event)
    event["schema_version"] = sv.version
    # Fields of newer versions, absent from this one, are present as None: one canonical shape, keys
    # in the latest version's order (RecordPacker packs records in that order as values alone).
    if sv is not rules.registry.latest:
        event = {**rules.latest_fields_as_none, **event}
    return event


def _check_ranges(e: dict) -> None:
    p = e.get("propensity")
    if p is not None and not 0.0 < p <= 1.0:
        raise Rejected(contract.OUT_OF_RANGE, "propensity", f"propensity must be in (0, 1], got {p!r}")
    for name in ("position", "dwell_ms", "value"):
        v = e.get(name)
        if v is not None and v < 0:
            raise Rejected(contract.OUT_OF_RANGE, name, f"{name} must be >= 0, got {v!r}")


def _iso(ms: int) -> str:
    try:
        return (_EPOCH + dt.timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")
    except OverflowError:
        return f"{ms} ms"


class TooLate(Exception):
    """A valid event that arrived later than the lateness limit after its event time."""

    def __init__(self, event: dict, late_ms: int, limit_ms: int):
        super().__init__(
            f"arrived {late_ms / 1000:.3f} s after its event time; the lateness limit is "
            f"{limit_ms / 1000:.0f} s (time.lateness)"
        )
        self.event, self.late_ms = event, late_ms


def parse_record(payload: bytes | dict, rules: ValidationRules, arrival_ms: int | None = None) -> dict:
    """One raw payload -> canonical event (with `arrival_time`). Raises Rejected, ConsentWithdrawn or TooLate.

    The arrival time comes from the transport (`arrival_ms`) or, for archives, from the envelope field
    `rules.arrival_field`, which is removed before the event is validated.
    """
    obj = payload if isinstance(payload, dict) else decode_payload(payload, rules.max_event_bytes)
    mark = None
    if isinstance(obj, dict) and PSEUDONYMISED_MARK in obj:  # a replayed dead letter (checked by ProtectPrivacy)
        obj = dict(obj)
        mark = obj.pop(PSEUDONYMISED_MARK)
    if rules.arrival_field and isinstance(obj, dict) and rules.arrival_field in obj:
        obj = dict(obj)
        value = obj.pop(rules.arrival_field)
        if value is not None:
            try:
                arrival_ms = parse_event_time(value, rules.naive_as_utc)
            except ValueError as e:
                raise Rejected(contract.BAD_TIMESTAMP, rules.arrival_field, f"{rules.arrival_field}: {e}") from None
            _in_avro_range(rules.arrival_field, "long", arrival_ms)  # written as arrival_time (timestamp-millis)
    event = validate_event(obj, rules)
    if mark is not None:
        event[PSEUDONYMISED_MARK] = mark
    event["arrival_time"] = arrival_ms
    if arrival_ms is not None and arrival_ms - event["event_time"] > rules.lateness_ms:
        raise TooLate(event, arrival_ms - event["event_time"], rules.lateness_ms)
    return event


def consent_stub(obj: dict, source: str) -> dict:
    """What is kept of a consent-withdrawn event: enough to count and audit it, nothing personal."""
    event_id = obj.get("event_id")
    event_type = obj.get("event_type")
    return {
        "event_id": None if event_id is None else str(event_id)[:200],
        "event_type": event_type if isinstance(event_type, str) else None,
        "source": source,
    }


# --- the transform ----------------------------------------------------------------------------


class _ParseFn(beam.DoFn):
    def __init__(self, rules: ValidationRules, key_source: KeySource, stamp_event_time: bool = True):
        self._rules = rules
        self._key_source = key_source
        self._stamp = stamp_event_time
        self._valid = Metrics.counter(METRICS_NS, "valid")
        self._valid_in_bundle = 0
        self._rejected = Metrics.counter(METRICS_NS, "dead_letter")
        self._consent = Metrics.counter(METRICS_NS, "consent_dropped")
        self._too_late = Metrics.counter(METRICS_NS, "too_late")
        self._pii = PiiCounters()

    def setup(self):
        self._redactor = Redactor(self._key_source.load())

    def _parse(self, element: RawRecord) -> tuple:
        """One RawRecord -> (None, event) for a valid event, else (tag, record) for its tagged output;
        counted, except valid events (the caller tallies them per bundle)."""
        source, payload, arrival_ms = element
        try:
            return None, parse_record(payload, self._rules, arrival_ms)
        except Rejected as r:
            self._rejected.inc()
            Metrics.counter(METRICS_NS, f"dead_letter_{r.reason}").inc()
            return ParseEvents.DEAD_LETTER, dead_letter(
                r.reason, r.field, r.message, "parse", payload, source, self._redactor
            )
        except TooLate as t:
            self._too_late.inc()
            record = dead_letter(contract.TOO_LATE, "event_time", str(t), "lateness", payload, source, self._redactor)
            record.update(
                event_id=self._redactor.redact_id("event_id", t.event["event_id"], count=False),
                event_time=t.event["event_time"],
                arrival_time=t.event["arrival_time"],
                late_ms=t.late_ms,
            )
            return ParseEvents.TOO_LATE, record
        except ConsentWithdrawn as c:
            self._consent.inc()
            return ParseEvents.CONSENT_DROPPED, protect_consent_stub(consent_stub(c.obj, source), self._redactor)

    def process(self, element: RawRecord) -> Iterable:
        tag, out = self._parse(element)
        if tag is not None:
            yield beam.pvalue.TaggedOutput(tag, out)
            return
        self._valid_in_bundle += 1
        yield beam.window.TimestampedValue(out, out["event_time"] / 1000.0) if self._stamp else out

    def start_bundle(self):
        self._redactor.drain()  # tallies of a failed bundle on this instance are not this bundle's
        self._valid_in_bundle = 0

    def finish_bundle(self):
        # PII findings and valid events are tallied here; one counter update per bundle, not per record.
        self._pii.flush(self._redactor)
        if self._valid_in_bundle:
            self._valid.inc(self._valid_in_bundle)
            self._valid_in_bundle = 0


class _ParseChunkFn(_ParseFn):
    """As _ParseFn, one RawChunk at a time: its valid events leave as one list (main output), every
    other record on its tagged output, one element each. Never stamps (bounded graphs only)."""

    def __init__(self, rules: ValidationRules, key_source: KeySource):
        super().__init__(rules, key_source, stamp_event_time=False)

    def process(self, chunk: RawChunk) -> Iterable:
        valid = []
        for element in chunk:
            tag, out = self._parse(element)
            if tag is None:
                valid.append(out)
            else:
                yield beam.pvalue.TaggedOutput(tag, out)
        if valid:
            self._valid_in_bundle += len(valid)
            yield valid


class ParseEvents(beam.PTransform):
    """RawRecord -> valid events (timestamped in event time) + consent stubs + dead letters + too-late
    events (dead-letter records with reason too_late, kept apart so they are counted as their own outcome).

    Args:
      rules: validation rules resolved on the launcher (ValidationRules.from_config).
      key_source: where the HMAC key for consent stubs and dead-letter redaction comes from.
      stamp_event_time: give valid events their event time as timestamp (windows and timers of the
        streaming steps need it). Bounded graphs pass False: their steps group in the global window
        and the per-key steps re-stamp what they emit, so the stamp would cost ~2 µs per event for
        nothing.
      chunked: the input is RawChunks (bounded graphs, stamp_event_time=False): VALID then holds
        lists of valid events, one per chunk (for ProtectPrivacy/EnrichEvents(chunked=True)); the
        other outputs still hold one record per input record, with the same counters.

    Returns the tagged outputs VALID (main), DEAD_LETTER, CONSENT_DROPPED and TOO_LATE.
    """

    VALID = "valid"
    DEAD_LETTER = "dead_letter"
    CONSENT_DROPPED = "consent_dropped"
    TOO_LATE = "too_late"

    def __init__(
        self, rules: ValidationRules, key_source: KeySource, stamp_event_time: bool = True, chunked: bool = False
    ):
        super().__init__()
        if not isinstance(rules, ValidationRules):
            raise TypeError(f"rules must be ValidationRules, got {type(rules).__name__}")
        if chunked and stamp_event_time:
            raise ValueError("chunked=True is for bounded graphs: pass stamp_event_time=False")
        self._rules = rules
        self._key_source = key_source
        self._stamp = stamp_event_time
        self._chunked = chunked

    def expand(self, raw: beam.PCollection[RawRecord]) -> beam.pvalue.DoOutputsTuple:
        if self._chunked:
            fn = _ParseChunkFn(self._rules, self._key_source)
        else:
            fn = _ParseFn(self._rules, self._key_source, self._stamp)
        return raw | "ParseAndValidate" >> beam.ParDo(fn).with_outputs(
            self.DEAD_LETTER, self.CONSENT_DROPPED, self.TOO_LATE, main=self.VALID
        )
