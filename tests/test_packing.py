"""Records through the bounded shuffles: packed and unpacked exactly (values, types, key order)."""

from __future__ import annotations

import collections
import datetime as dt
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.records import RecordPacker, Unpacked, pack_values, unpack_values

ORDER = ("event_id", "event_type", "event_time", "user_id", "item_meta", "bot_rule")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # any size: marshal keeps big ints
    st.floats(allow_nan=False),
    st.text(),  # includes lone surrogates, as non-UTF-8 input keeps them
    st.binary(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)


def same(a, b) -> bool:
    """Equal, with the same types and dict key order all the way down (True is not 1 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ORDER + ("extra", "x")), values, max_size=8))
def test_any_record_comes_back_exactly(record):
    packer = RecordPacker(ORDER)
    assert same(packer.unpack(packer.pack(record)), record)


@settings(max_examples=100, deadline=None)
@given(st.lists(values, min_size=len(ORDER), max_size=len(ORDER)), st.integers(0, len(ORDER)))
def test_records_in_field_order_are_packed_as_values_alone(vals, n):
    record = dict(zip(ORDER[:n], vals[:n]))
    packer = RecordPacker(ORDER)
    packed = packer.pack(record)
    assert same(packer.unpack(packed), record)
    # The names are not in the bytes: only the values are.
    assert isinstance(unpack_values(packed), tuple)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(ORDER + ("extra", "x")), values, max_size=8),
    st.lists(st.sampled_from(ORDER + ("extra", "absent")), max_size=4),
)
def test_reader_reads_named_fields_as_the_unpacked_record_has_them(record, names):
    """RecordPacker.reader: the named values of any packed record (values alone or the whole dict, a
    prefix of the order or not), None where absent, as `unpack(...).get` gives them."""
    packer = RecordPacker(ORDER)
    packed = packer.pack(record)
    assert same(packer.reader(*names)(packed), tuple(record.get(n) for n in names))


def test_other_key_orders_and_unknown_fields_keep_their_order():
    packer = RecordPacker(ORDER)
    for record in (
        {"event_type": "click", "event_id": "e1"},  # a prefix's names, another order
        {"event_id": "e1", "event_type": "click", "zzz": 1},  # a field not in the order
        {"event_id": "e1", "event_type": "click", "event_time": 5, "user_id": "u", "bot_rule": None},  # a gap
    ):
        back = packer.unpack(packer.pack(record))
        assert same(back, record), record


def test_values_marshal_cannot_write_are_pickled():
    record = {"event_id": "e1", "event_type": "click", "event_time": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)}
    packer = RecordPacker(ORDER)
    packed = packer.pack(record)
    assert packed[0] == 0x80  # pickle's PROTO opcode
    assert same(packer.unpack(packed), record)
    chunk = [("f.avro#1", {"t": dt.date(2026, 1, 1)}, None), ("f.jsonl:2", b"{}", 7)]
    assert unpack_values(pack_values(chunk)) == chunk


def test_an_empty_record_and_an_empty_order():
    assert RecordPacker(ORDER).unpack(RecordPacker(ORDER).pack({})) == {}
    record = {"b": 1, "a": [1, 2]}
    assert same(RecordPacker().unpack(RecordPacker().pack(record)), record)


def test_unpacked_groups_can_be_read_twice():
    packer = RecordPacker(ORDER)
    records = [{"event_id": f"e{i}", "event_type": "click"} for i in range(5)]
    group = packer.unpacked([packer.pack(r) for r in records])
    assert isinstance(group, Unpacked)
    assert list(group) == records
    assert list(group) == records  # re-iterable: the bots step counts first, then sorts


def test_dict_subclasses_come_back_as_themselves():
    packer = RecordPacker(ORDER)
    for record in (
        collections.OrderedDict([("event_type", 1), ("event_id", 2)]),
        collections.OrderedDict([("event_id", "e1"), ("event_type", "click")]),  # a prefix of the order
        collections.defaultdict(int, {"zz": 1}),
    ):
        back = packer.unpack(packer.pack(record))
        assert type(back) is type(record) and list(back.items()) == list(record.items())


def test_bytes_like_values_come_back_as_bytes():
    assert unpack_values(pack_values({"blob": bytearray(b"x"), "view": memoryview(b"y")})) == {
        "blob": b"x",
        "view": b"y",
    }


@pytest.mark.parametrize("max_values", [1, 3, 50_000])
def test_keyed_lists_hold_every_value_once_in_order(max_values):
    """KeyedListsFn: the lists emitted mid-bundle (every `max_values` values) and when the bundle ends
    (in the global window) concatenate, per key, to the values added, in the order added."""
    from apache_beam.transforms import window

    from transforms.records import KeyedListsFn

    class Gather(KeyedListsFn):
        def process(self, kv):
            yield from self._add(*kv)

    pairs = [(f"k{i % 4}", i) for i in range(23)]
    fn = Gather(max_values)
    fn.start_bundle()
    emitted = [kv for pair in pairs for kv in fn.process(pair)]
    ended = list(fn.finish_bundle())
    assert all(wv.windows == (window.GlobalWindow(),) for wv in ended)
    emitted += [wv.value for wv in ended]
    keys = [key for key, _ in emitted]
    assert (len(keys) == len(set(keys))) == (max_values > len(pairs))
    gathered = {}
    for key, values in emitted:
        gathered.setdefault(key, []).extend(values)
    expected = {}
    for key, value in pairs:
        expected.setdefault(key, []).append(value)
    assert gathered == expected
    fn.start_bundle()  # a new bundle starts empty
    assert list(fn.finish_bundle()) == []
