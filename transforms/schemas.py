"""Versioned Avro event schemas, read side by side, and the backward-compatibility gate.

A folder holds `event.v<N>.avsc` files. `SchemaRegistry` loads them all (fastavro parses and checks
each), gives every version its field table (used to validate JSON events) and recognises the writer
schema of an Avro file. `check_backward_compatible` is what `python -m pipelines.schema_check check` runs:
a new version must be able to read every record written with the previous one.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form
from fastavro.utils import generate_many

_FILE_RE = re.compile(r"^event\.v(\d+)\.avsc$")
NULL = "null"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What one schema field accepts, reduced to what JSON validation needs."""

    name: str
    kind: str  # string | int | long | double | float | boolean | map | timestamp
    required: bool  # no null in the union
    map_values: str | None = None


@dataclasses.dataclass(frozen=True)
class SchemaVersion:
    version: int
    path: str
    schema: dict  # the .avsc as written
    parsed: dict  # fastavro.parse_schema output
    fields: tuple[FieldSpec, ...]
    canonical: str  # Parsing Canonical Form, to recognise Avro writer schemas

    @functools.cached_property
    def field_names(self) -> frozenset:
        return frozenset(f.name for f in self.fields)


class SchemaError(ValueError):
    pass


def _field_spec(field: dict) -> FieldSpec:
    t = field["type"]
    required = True
    if isinstance(t, list):
        non_null = [x for x in t if x != NULL]
        required = NULL not in t
        if len(non_null) != 1:
            raise SchemaError(f"field {field['name']}: only [null, T] unions are supported, got {t}")
        t = non_null[0]
    map_values = None
    if isinstance(t, dict):
        if t.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
            kind = "timestamp"
        elif t.get("type") == "map":
            kind, map_values = "map", t["values"]
        else:
            kind = t.get("type")
    else:
        kind = t
    if kind not in ("string", "int", "long", "double", "float", "boolean", "map", "timestamp"):
        raise SchemaError(f"field {field['name']}: type {kind!r} is not supported for events")
    return FieldSpec(field["name"], kind, required, map_values)


def load_schema_file(path: Path, version: int) -> SchemaVersion:
    try:
        schema = json.loads(path.read_text())
        parsed = fastavro.parse_schema(schema)
    except (ValueError, fastavro.schema.SchemaParseException) as e:
        raise SchemaError(f"{path}: not a valid Avro schema: {e}") from None
    fields = tuple(_field_spec(f) for f in schema["fields"])
    return SchemaVersion(version, str(path), schema, parsed, fields, to_parsing_canonical_form(parsed))


class SchemaRegistry:
    """All event schema versions in one folder, oldest first."""

    def __init__(self, versions: Iterable[SchemaVersion]):
        self._by_version = {v.version: v for v in sorted(versions, key=lambda v: v.version)}
        if not self._by_version:
            raise SchemaError("no event schema versions found")
        self._by_canonical = {v.canonical: v for v in self._by_version.values()}

    @classmethod
    def from_directory(cls, directory: str) -> SchemaRegistry:
        d = Path(directory)
        if not d.is_dir():
            raise SchemaError(f"schema directory {directory!r} does not exist")
        versions = []
        for p in sorted(d.iterdir()):
            m = _FILE_RE.match(p.name)
            if m:
                versions.append(load_schema_file(p, int(m.group(1))))
        if not versions:
            raise SchemaError(f"no event.v<N>.avsc files in {directory!r}")
        return cls(versions)

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(self._by_version)

    @property
    def latest(self) -> SchemaVersion:
        return self._by_version[max(self._by_version)]

    def get(self, version: int) -> SchemaVersion | None:
        return self._by_version.get(version)

    def match_writer(self, writer_schema: dict) -> SchemaVersion | None:
        """The registered version an Avro file was written with, or None."""
        try:
            canonical = to_parsing_canonical_form(fastavro.parse_schema(writer_schema))
        except Exception:  # noqa: BLE001 - an unparsable writer schema is simply not a match
            return None
        return self._by_canonical.get(canonical)


# --- backward compatibility -------------------------------------------------------------------


def _type_name(t: Any) -> str:
    if isinstance(t, dict):
        return t.get("logicalType") or t.get("type")
    return t if isinstance(t, str) else json.dumps(t)


def static_incompatibilities(old: dict, new: dict) -> list[str]:
    """Reasons a reader with `new` cannot read data written with `old`, field by field."""
    problems = []
    old_fields = {f["name"]: f for f in old["fields"]}
    for f in new["fields"]:
        if f["name"] not in old_fields and "default" not in f:
            problems.append(
                f"field {f['name']!r} is new and has no default: records written with the old version "
                f'cannot be read. Give it a default (for an optional field: "type": ["null", ...], "default": null)'
            )
    for f in old["fields"]:
        if f["name"] not in {g["name"] for g in new["fields"]}:
            # Removing a field is backward compatible for the reader, but our producers may still send
            # it: the JSON path would then reject their events as schema violations. Say so.
            problems.append(
                f"field {f['name']!r} was removed: events that still carry it would be rejected as "
                f"schema_violation. Keep it (optional, default null) until no producer sends it"
            )
    return problems


def check_backward_compatible(old: SchemaVersion, new: SchemaVersion, samples: int = 200) -> list[str]:
    """Empty list when `new` can read everything `old` wrote; otherwise the reasons.

    Two checks: the field rules above, then a real round trip -- fastavro writes random records with
    the old schema and reads them back with the new one as reader schema (Avro schema resolution).
    """
    problems = static_incompatibilities(old.schema, new.schema)
    buf = io.BytesIO()
    fastavro.writer(buf, old.parsed, generate_many(old.parsed, samples))
    buf.seek(0)
    try:
        for _ in fastavro.reader(buf, reader_schema=new.parsed):
            pass
    except Exception as e:  # noqa: BLE001 - any resolution failure is the answer we report
        problems.append(f"Avro schema resolution failed reading v{old.version} data with v{new.version}: {e}")
    return problems


def check_registry(registry: SchemaRegistry) -> dict[int, list[str]]:
    """Each version checked against the one before it: {new_version: problems}."""
    result = {}
    versions = registry.versions
    for prev, cur in zip(versions, versions[1:]):
        result[cur] = check_backward_compatible(registry.get(prev), registry.get(cur))
    return result
