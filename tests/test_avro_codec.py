"""The compiled Avro encoder writes fastavro's bytes, or fails with fastavro's error, for any value."""

from __future__ import annotations

import datetime as dt
import io
import math

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SCHEMA_DIR
from transforms.avro_codec import AvroFileWriter, AvroRecordEncoder, compile_encoder, encode_avro_file
from transforms.labels import LABEL_SCHEMA, SLATE_SCHEMA
from transforms.records import clean_event_schema
from transforms.schemas import SchemaRegistry

CLEAN_SCHEMA = clean_event_schema(SchemaRegistry.from_directory(str(SCHEMA_DIR)))
SCHEMAS = {"clean": CLEAN_SCHEMA, "label": LABEL_SCHEMA, "slate": SLATE_SCHEMA}
MARKER = b"0123456789abcdef"


def fastavro_bytes(schema: dict, record) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def outcome(fn, *args):
    """('ok', result) or ('error', exception type)."""
    try:
        return "ok", fn(*args)
    except Exception as e:  # noqa: BLE001 - the comparison is of which error
        return "error", type(e)


# Values of the types each schema declares, and of types it does not (the fallback's cases).
WELL_TYPED = {
    "string": st.text(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "double": st.floats(allow_nan=True),
    "boolean": st.booleans(),
}
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too
    st.floats(),
    st.text(),  # lone surrogates too: not UTF-8 encodable
    st.binary(max_size=8),
    st.datetimes(timezones=st.just(dt.timezone.utc)),
    st.lists(st.text(max_size=3), max_size=3),
    st.tuples(st.text(max_size=3)),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
)


def value_for(schema, draw):
    """A value of `schema`'s type (a well-typed record field), drawn with `draw`."""
    if isinstance(schema, list):
        branch = draw(st.sampled_from(schema))
        return None if branch == "null" else value_for(branch, draw)
    if isinstance(schema, dict):
        kind = schema["type"]
        if kind == "array":
            return [value_for(schema["items"], draw) for _ in range(draw(st.integers(0, 3)))]
        if kind == "map":
            return {
                draw(st.text(max_size=4)): value_for(schema["values"], draw) for _ in range(draw(st.integers(0, 3)))
            }
        if kind == "record":
            return {f["name"]: value_for(f["type"], draw) for f in schema["fields"]}
        return value_for(kind, draw)
    return draw(WELL_TYPED[schema])


@st.composite
def records(draw, schema):
    """Well-typed records, with some fields given any value, dropped or added."""
    record = value_for(schema, draw)
    for field in schema["fields"]:
        roll = draw(st.integers(0, 9))
        if roll == 0:
            record[field["name"]] = draw(ANY_VALUE)
        elif roll == 1:
            record.pop(field["name"], None)
    if draw(st.booleans()):
        record["not_in_schema"] = draw(ANY_VALUE)
    return record


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_job_schemas_compile(name):
    assert compile_encoder(SCHEMAS[name]) is not None


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_record_gets_fastavro_bytes_or_fastavro_error(name, data):
    schema = SCHEMAS[name]
    record = data.draw(records(schema))
    expected = outcome(fastavro_bytes, schema, record)
    assert outcome(AvroRecordEncoder(schema).encode, record) == expected


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_well_typed_records_take_the_compiled_path(name, data):
    """The compiled function itself (not the fallback) writes the valid records: the speed is real."""
    schema = SCHEMAS[name]
    record = value_for(schema, data.draw)
    assert compile_encoder(schema)(record) == fastavro_bytes(schema, record)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_values_fastavro_converts_go_to_fastavro(data):
    schema = LABEL_SCHEMA
    label = value_for(schema, data.draw)
    label["impression_time"] = dt.datetime(2026, 11, 2, 18, 0, tzinfo=dt.timezone.utc)  # timestamp-millis
    label["weight"] = 1  # an int where a double is declared
    label["outcome_types"] = ("click",)  # a tuple for an array
    assert AvroRecordEncoder(schema).encode(label) == fastavro_bytes(schema, label)


def test_out_of_range_and_unencodable_values_fail_as_fastavro_fails():
    schema = {"type": "record", "name": "r", "fields": [{"name": "n", "type": "long"}, {"name": "s", "type": "string"}]}
    for record in ({"n": 2**70, "s": "x"}, {"n": 1, "s": "\ud800"}, {"n": 1}, {"s": "x"}):
        assert outcome(AvroRecordEncoder(schema).encode, record) == outcome(fastavro_bytes, schema, record)


def test_nan_and_negative_zero_keep_their_bits():
    schema = {"type": "record", "name": "r", "fields": [{"name": "d", "type": ["null", "double"]}]}
    for value in (math.nan, -0.0, math.inf, -math.inf, 5e-324):
        assert AvroRecordEncoder(schema).encode({"d": value}) == fastavro_bytes(schema, {"d": value})


def test_schemas_it_does_not_compile_are_written_by_fastavro():
    schema = {
        "type": "record",
        "name": "r",
        "fields": [
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
            {"name": "u", "type": ["string", "long"]},
        ],
    }
    assert compile_encoder(schema) is None
    record = {"e": "B", "u": 7}
    assert AvroRecordEncoder(schema).encode(record) == fastavro_bytes(schema, record)


def test_a_field_with_a_default_missing_from_the_record_gets_the_default():
    schema = {"type": "record", "name": "r", "fields": [{"name": "n", "type": "long", "default": 42}]}
    assert AvroRecordEncoder(schema).encode({}) == fastavro_bytes(schema, {})


@pytest.mark.parametrize("codec,level", [("null", None), ("deflate", 1), ("deflate", None)])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_files_are_fastavros_files(codec, level, data):
    """Same header, block boundaries and compression: byte for byte the file fastavro's Writer writes
    (a few thousand records cross several 16,000-byte blocks)."""
    schema = CLEAN_SCHEMA
    n = data.draw(st.sampled_from([0, 1, 7, 900]))
    batch = [value_for(schema, data.draw) for _ in range(min(n, 40))] * max(1, n // 40)
    batch = batch[:n]
    ours = io.BytesIO()
    writer = AvroFileWriter(ours, schema, codec=codec, compression_level=level, sync_marker=MARKER)
    for record in batch:
        writer.write(record)
    writer.flush()
    theirs = io.BytesIO()
    reference = fastavro.write.Writer(
        theirs, fastavro.parse_schema(schema), codec=codec, sync_marker=MARKER, compression_level=level
    )
    for record in batch:
        reference.write(record)
    reference.flush()
    assert ours.getvalue() == theirs.getvalue()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_encode_avro_file_is_fastavro_writer_with_the_same_marker(data):
    schema = SLATE_SCHEMA
    batch = [value_for(schema, data.draw) for _ in range(5)]
    expected = io.BytesIO()
    fastavro.writer(expected, fastavro.parse_schema(schema), batch, sync_marker=MARKER)
    assert encode_avro_file(batch, schema, sync_marker=MARKER) == expected.getvalue()


def test_values_fastavro_refuses_where_a_union_is_resolved_are_refused():
    """fastavro checks a union's branch in full (an int's 32 bits, a record's "-type"): the compiled
    path leaves those values to it."""
    item = {"type": "record", "name": "Item", "fields": [{"name": "x", "type": "string"}]}
    schema = {
        "type": "record",
        "name": "r",
        "fields": [
            {"name": "i", "type": ["null", "int"], "default": None},
            {"name": "a", "type": ["null", {"type": "array", "items": "int"}], "default": None},
            {"name": "d", "type": ["null", {"type": "int", "logicalType": "date"}], "default": None},
            {"name": "rec", "type": ["null", item], "default": None},
        ],
    }
    for record in (
        {"i": 2**31},
        {"i": -(2**31) - 1},
        {"a": [1, 2**40]},
        {"d": 2**40},
        {"rec": {"x": "s", "-type": "Other"}},
        {"i": 2**31 - 1, "a": [-(2**31)], "d": 19000, "rec": {"x": "s"}},
    ):
        assert outcome(AvroRecordEncoder(schema).encode, record) == outcome(fastavro_bytes, schema, record), record


def test_an_int_beyond_32_bits_in_a_slate_is_refused_as_fastavro_refuses_it():
    slate = {
        "request_id": "r",
        "user_id": "u",
        "policy": None,
        "experiment_id": None,
        "variant": None,
        "impression_time": 1793000000000,
        "n_items": 1,
        "n_positive": 0,
        "items": [{"item_id": "i", "position": 2**31, "propensity": None, "label": 0, "weight": 1.0}],
    }
    assert outcome(AvroRecordEncoder(SLATE_SCHEMA).encode, slate) == outcome(fastavro_bytes, SLATE_SCHEMA, slate)
    assert outcome(AvroRecordEncoder(SLATE_SCHEMA).encode, slate)[0] == "error"


def test_a_schema_nested_deeper_than_python_compiles_is_written_by_fastavro():
    schema = {"type": "record", "name": "R0", "fields": [{"name": "v", "type": "string"}]}
    record = {"v": "x"}
    for depth in range(1, 30):
        schema = {
            "type": "record",
            "name": f"R{depth}",
            "fields": [{"name": "n", "type": {"type": "array", "items": schema}}],  # a loop per level
        }
        record = {"n": [record]}
    assert AvroRecordEncoder(schema).encode(record) == fastavro_bytes(schema, record)
