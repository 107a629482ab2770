"""The clean-event output schema: the latest input schema, minus the raw IP, plus what the pipeline adds."""

from __future__ import annotations

import copy
import marshal
import pickle
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from transforms.accounting import in_global_window
from transforms.schemas import SchemaRegistry


def _opt(name, avro_type, doc):
    return {"name": name, "type": ["null", avro_type], "default": None, "doc": doc}


_STRING_MAP = {"type": "map", "values": "string"}

ADDED_FIELDS = [
    _opt(
        "arrival_time",
        {"type": "long", "logicalType": "timestamp-millis"},
        "When the pipeline received the event (Pub/Sub publish time or the archive's record); null if unknown.",
    ),
    _opt("ip_hash", "string", "Keyed pseudonym (HMAC-SHA256) of the client IP."),
    _opt("ip_network", "string", "Client IP truncated to its network (e.g. 203.0.113.0/24)."),
    _opt("browser", "string", "Browser family from the user agent."),
    _opt("browser_version", "string", "Browser major version."),
    _opt("os", "string", "Operating-system family."),
    _opt("os_version", "string", "Operating-system major version."),
    _opt("device_class", "string", "desktop | mobile | tablet | tv | console | bot | unknown."),
    _opt("item_meta", _STRING_MAP, "Item metadata from the items side input (None: not found or none configured)."),
    _opt("user_meta", _STRING_MAP, "User metadata from the users side input."),
    _opt("experiment_meta", _STRING_MAP, "Experiment metadata from the experiments side input."),
    _opt("bot_rule", "string", "Bot rule that flagged the event (bots output only)."),
    _opt("bot_detail", "string", "Why the rule fired."),
]
REMOVED_FIELDS = ("ip",)


def clean_event_schema(registry: SchemaRegistry) -> dict:
    schema = copy.deepcopy(registry.latest.schema)
    schema["name"] = "CleanEvent"
    schema["doc"] = (
        f"A valid event after privacy, enrichment, dedupe and bot filtering (input schema v{registry.latest.version})."
    )
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in REMOVED_FIELDS] + copy.deepcopy(ADDED_FIELDS)
    return schema


def field_order(schema: dict) -> tuple[str, ...]:
    """An Avro record schema's field names, in order (the key order of the records built for it)."""
    return tuple(f["name"] for f in schema["fields"])


def pack_values(value) -> bytes:
    """A value of builtin types -> compact bytes. `marshal` keeps str, int (any size), float, bool,
    None, bytes, list, tuple, set and dict exactly, key order included; its format belongs to the
    Python version, which every worker of a Beam job shares. A value marshal cannot write (another
    type inside, a dict subclass) is pickled instead. Other bytes-like values (bytearray, memoryview)
    come back as bytes: marshal writes any buffer as bytes."""
    try:
        return marshal.dumps(value)
    except ValueError:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_values(packed: bytes):
    # A pickle starts with its PROTO opcode, 0x80; no marshal type code is 0x80.
    if packed[0] == 0x80:
        return pickle.loads(packed)
    return marshal.loads(packed)


class RecordPacker:
    """Record dicts <-> compact bytes, for the values of the bounded graph's GroupByKeys.

    Beam codes a dict value key by key (the names in every element) and FnApiRunner keeps grouped
    values decoded, as dicts, until the group is read: a 29-key event held ~1.9 KB of objects there
    and cost two encode/decode pairs per shuffle. Packed (`pack_values`), it is one ~400-byte
    `bytes` (not tracked by the garbage collector), packed and unpacked once. A record whose keys
    are the leading names of `field_order`, in that order (what parse, privacy and enrichment
    build), is packed as its values alone; any other record as the whole dict.

    Args:
      field_order: the record fields in their usual order (`field_order(schema)`); empty: pack every
        record as a whole dict.
    """

    def __init__(self, field_order: Sequence[str] = ()):
        self._order = tuple(field_order)
        # Records usually carry a prefix of the order (bot fields come last and are added last).
        self._orders_by_length = {n: self._order[:n] for n in range(len(self._order) + 1)}

    def pack(self, record: dict) -> bytes:
        if type(record) is dict and self._orders_by_length.get(len(record)) == tuple(record):
            return pack_values(tuple(record.values()))
        return pack_values(record)

    def unpack(self, packed: bytes) -> dict:
        values = unpack_values(packed)
        if isinstance(values, dict):  # packed whole (a dict subclass comes back pickled, as itself)
            return values
        return dict(zip(self._order, values))

    def unpacked(self, packed: Iterable[bytes]) -> Unpacked:
        return Unpacked(self, packed)

    def reader(self, *names: str):
        """A function: packed record -> the values of `names` (None where absent), without building the
        record's dict (a step that only routes a record reads a key or two of it)."""
        indices = tuple(self._order.index(n) if n in self._order else None for n in names)

        def read(packed: bytes) -> tuple:
            values = unpack_values(packed)
            if type(values) is tuple:  # packed as its values: a prefix of the field order
                n = len(values)
                return tuple([values[i] if i is not None and i < n else None for i in indices])
            return tuple([values.get(name) for name in names])

        return read


class Unpacked:
    """A grouped iterable of packed records, read as dicts: unpacked on each pass, never all held."""

    __slots__ = ("_packer", "_packed")

    def __init__(self, packer: RecordPacker, packed: Iterable[bytes]):
        self._packer, self._packed = packer, packed

    def __iter__(self) -> Iterator[dict]:
        return map(self._packer.unpack, self._packed)


def append_to(lists: dict, key, value) -> None:
    """Appends `value` to the list of `key` in {key: [values]} (a per-bundle gathering's step)."""
    values = lists.get(key)
    if values is None:
        lists[key] = [value]
    else:
        values.append(value)


class KeyedListsFn(beam.DoFn):
    """Base of the bounded graph's keying steps before a GroupByKey: values gathered per key over a
    bundle, emitted as (key, [values]) every `max_values` values (bounded memory) and when the bundle
    ends (in the global window, where the bounded graph's records are). The GroupByKey then carries one
    element per key and flush instead of one per value: the runner's per-element work (a coder call on
    each side, an entry in FnApiRunner's grouping table) is paid per list. The step after the
    GroupByKey reads lists of values; within a list they keep the order they came in.

    Subclasses call `_add` (or fill `_lists` and count in `_n`) from `process`, and yield what it returns.
    A flush mixes the values of its bundle: the input must be in the global window
    (`require_global_window` when the graph is built), or windows would be grouped together.
    """

    @staticmethod
    def require_global_window(pcoll, step: str) -> None:
        """Refuses, when the graph is built, input in any window but the global one."""
        if not in_global_window(pcoll):
            raise ValueError(
                f"{step} gathers records per bundle for a GroupByKey and needs them in the global window"
                f" (bounded input), not {type(pcoll.windowing.windowfn).__name__}"
            )

    def __init__(self, max_values: int = 50_000):
        self._max_values = max_values

    def start_bundle(self):
        self._lists, self._n = {}, 0

    def _add(self, key, value):
        append_to(self._lists, key, value)
        self._n += 1
        return self._drain() if self._n >= self._max_values else ()

    def _drain(self):
        lists, self._lists, self._n = self._lists, {}, 0
        return lists.items()

    def finish_bundle(self):
        for kv in self._drain():
            yield WindowedValue(kv, window.GlobalWindow().max_timestamp(), (window.GlobalWindow(),))
