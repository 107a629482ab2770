"""Parse and validate: one test per reason code, plus the accepted shapes."""

import orjson
import pytest

from transforms import contract
from transforms.parse import ConsentWithdrawn, Rejected, parse_event_time, parse_record

BASE = {"event_id": "e1", "event_type": "click", "event_time": "2026-11-01T10:00:00.123Z", "user_id": "u1"}


def raw(**overrides):
    obj = {**BASE, **overrides}
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


def reject(payload, rules):
    with pytest.raises(Rejected) as e:
        parse_record(payload, rules)
    return e.value


def test_valid_event_is_canonical(rules):
    e = parse_record(raw(item_id="i1", position=3, propensity=0.25, context={"page": "home"}), rules)
    assert e["event_time"] == 1793527200123
    assert e["position"] == 3 and e["propensity"] == 0.25 and e["schema_version"] == 2
    assert e["context"] == {"page": "home"} and e["variant"] is None


@pytest.mark.parametrize(
    "value,expected",
    [
        ("2026-11-01T11:00:00+01:00", 1793527200000),
        (1793527200000, 1793527200000),
        ("1793527200000", 1793527200000),
    ],
)
def test_event_time_formats(value, expected):
    assert parse_event_time(value, naive_as_utc=False) == expected


def test_numeric_ids_become_text(rules):
    assert parse_record(raw(user_id=48213, item_id=7), rules)["user_id"] == "48213"


def test_v1_event_without_v2_fields(rules):
    e = parse_record(raw(schema_version=1), rules)
    assert e["schema_version"] == 1 and e["context"] is None


@pytest.mark.parametrize(
    "payload,reason,field",
    [
        (b'{"event_id": "e1", ', contract.MALFORMED_JSON, None),
        (b"", contract.MALFORMED_JSON, None),
        (b'{"event_id": "caf\xe9"}', contract.BAD_ENCODING, None),
        (b"[1, 2]", contract.NOT_AN_OBJECT, None),
        (b'"hello"', contract.NOT_AN_OBJECT, None),
        (raw(user_id=...), contract.MISSING_FIELD, "user_id"),
        (raw(event_id=""), contract.MISSING_FIELD, "event_id"),
        (raw(position="third"), contract.WRONG_TYPE, "position"),
        (raw(consent="yes"), contract.WRONG_TYPE, "consent"),
        (raw(user_id=True), contract.WRONG_TYPE, "user_id"),
        (raw(user_id={"id": 1}), contract.WRONG_TYPE, "user_id"),
        (raw(context=["a"]), contract.WRONG_TYPE, "context"),
        (raw(context={"n": 1}), contract.WRONG_TYPE, "context.n"),
        (raw(propensity="high"), contract.WRONG_TYPE, "propensity"),
        (raw(event_time="yesterday"), contract.BAD_TIMESTAMP, "event_time"),
        (raw(event_time="2026-13-45T99:00:00Z"), contract.BAD_TIMESTAMP, "event_time"),
        (raw(event_time="2026-11-01T10:00:00"), contract.BAD_TIMESTAMP, "event_time"),
        (raw(event_time=1761990000), contract.BAD_TIMESTAMP, "event_time"),
        (raw(event_time="2099-01-01T00:00:00Z"), contract.BAD_TIMESTAMP, "event_time"),
        (raw(event_type="hover"), contract.UNKNOWN_EVENT_TYPE, "event_type"),
        (raw(event_type="CLICK "), contract.UNKNOWN_EVENT_TYPE, "event_type"),
        (raw(propensity=0), contract.OUT_OF_RANGE, "propensity"),
        (raw(propensity=1.5), contract.OUT_OF_RANGE, "propensity"),
        (raw(position=-1), contract.OUT_OF_RANGE, "position"),
        (raw(dwell_ms=-5), contract.OUT_OF_RANGE, "dwell_ms"),
        (raw(value=-1.0), contract.OUT_OF_RANGE, "value"),
        (raw(context={"q": "x" * 40000}), contract.OVERSIZE_PAYLOAD, None),
        (raw(foo=1), contract.SCHEMA_VIOLATION, "foo"),
        (raw(schema_version=1, context={"a": "b"}), contract.SCHEMA_VIOLATION, "context"),
        (raw(schema_version=99), contract.SCHEMA_VIOLATION, "schema_version"),
    ],
)
def test_every_reason_code(payload, reason, field, rules):
    r = reject(payload, rules)
    assert (r.reason, r.field) == (reason, field), r.message
    if field:
        assert field.split(".")[0] in r.message


def test_epoch_seconds_hint(rules):
    assert "epoch seconds" in reject(raw(event_time=1761990000), rules).message


def test_consent_false_wins_over_other_defects(rules):
    with pytest.raises(ConsentWithdrawn):
        parse_record(raw(consent=False, event_type="hover"), rules)


@pytest.mark.parametrize(
    "pair",
    [b'"consent": false, "consent": true', b'"consent": true, "consent": false', b'"consen\\u0074": false'],
    ids=["false-then-true", "true-then-false", "escaped-key"],
)
def test_consent_false_in_any_repeated_or_escaped_key_withdraws(pair, rules):
    """JSON keeps the last of repeated keys; a record that says consent: false anywhere is withdrawn."""
    payload = raw()[:-1] + b", " + pair + b"}"
    with pytest.raises(ConsentWithdrawn):
        parse_record(payload, rules)
    assert parse_record(raw()[:-1] + b', "consent": true, "consent": true}', rules)["consent"] is True


def test_avro_record_dict_is_validated_too(rules):
    import datetime as dt

    rec = {**BASE, "event_time": dt.datetime(2026, 11, 1, 10, tzinfo=dt.timezone.utc), "schema_version": 2}
    assert parse_record(rec, rules)["event_time"] == 1793527200000
    assert reject({**rec, "propensity": 2.0}, rules).reason == contract.OUT_OF_RANGE


def test_every_version_gives_the_latest_shape(rules):
    """Fields a version lacks are None, and every version's event has the latest version's key order
    (the order RecordPacker packs as values alone)."""
    latest = rules.registry.latest
    order = [f.name for f in latest.fields]
    for version in rules.registry.versions:
        e = parse_record(raw(schema_version=version), rules)
        assert list(e)[: len(order)] == order and e["schema_version"] == version
        absent = latest.field_names - rules.registry.get(version).field_names - {"schema_version"}
        assert all(e[n] is None for n in absent)


@pytest.mark.parametrize("text", [b"", b"   ", b"\n\t "])
def test_empty_record_is_named_empty(rules, text):
    r = reject(text, rules)
    assert (r.reason, r.message) == (contract.MALFORMED_JSON, "record is empty")


@pytest.mark.parametrize(
    "overrides,field",
    [({"user_id": True}, "user_id"), ({"event_type": 3.5}, "event_type"), ({"position": "3"}, "position")],
)
def test_wrong_type_message_names_field_and_value(rules, overrides, field):
    r = reject(raw(**overrides), rules)
    assert r.reason == contract.WRONG_TYPE and r.field == field and repr(overrides[field]) in r.message
