"""Enrichment: user agent -> browser / OS / device class, and item, user and experiment metadata.

User agents are parsed by `ua-parser` (the maintained uap-core rules, with its Rust accelerator);
device class is derived from its result. Metadata tables are side inputs read from CSV, JSONL or
Avro files. A missing lookup is a counted default (None), never an error.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterable
from functools import lru_cache

import apache_beam as beam
import fastavro
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from ua_parser import parse as parse_user_agent

from transforms.io import read_all
from transforms.privacy import KeySource, Pseudonymiser

METRICS_NS = "feedback.enrich"

DESKTOP_OS = frozenset(
    {
        "Windows",
        "Mac OS X",
        "macOS",
        "Linux",
        "Ubuntu",
        "Chrome OS",
        "Fedora",
        "Debian",
        "FreeBSD",
        "OpenBSD",
        "NetBSD",
        "Solaris",
        "Mint",
        "Arch Linux",
        "Gentoo",
        "openSUSE",
        "Red Hat",
        "Kubuntu",
        "Windows NT",
        "Windows XP",
        "Windows 7",
        "Windows 8",
        "Windows 10",
    }
)
MOBILE_OS = frozenset(
    {
        "iOS",
        "Android",
        "Windows Phone",
        "BlackBerry OS",
        "KaiOS",
        "Firefox OS",
        "Symbian OS",
        "HarmonyOS",
        "Tizen",
        "Sailfish",
    }
)
_TV_RE = re.compile(
    r"smart-?tv|\bTV\b|GoogleTV|AppleTV|Apple TV|CrKey|BRAVIA|HbbTV|Web0S|webOS.TV|Roku|AFT[A-Z]|"
    r"NetCast|Viera|AndroidTV|Android TV",
    re.IGNORECASE,
)
_CONSOLE_RE = re.compile(r"PlayStation|Xbox|Nintendo|Nintendo Switch", re.IGNORECASE)
_TABLET_RE = re.compile(
    r"iPad|Tablet|Kindle|Silk/|PlayBook|Nexus (7|9|10)\b|SM-T\d|SM-X\d|Tab\b|Lenovo TB|MediaPad", re.IGNORECASE
)


@dataclasses.dataclass(frozen=True)
class Device:
    browser: str | None
    browser_version: str | None
    os: str | None
    os_version: str | None
    device_class: str  # desktop | mobile | tablet | tv | console | bot | unknown


def classify_device(ua: str | None) -> Device:
    """A user-agent string -> browser, OS and device class (pure; cached per process)."""
    if not ua:
        return Device(None, None, None, None, "unknown")
    return _classify_cached(ua)


@lru_cache(maxsize=100_000)
def _classify_cached(ua: str) -> Device:
    r = parse_user_agent(ua)
    browser = r.user_agent.family if r.user_agent else None
    browser_version = r.user_agent.major if r.user_agent else None
    os_family = r.os.family if r.os else None
    os_version = r.os.major if r.os else None
    device_family = r.device.family if r.device else ""
    brand = (r.device.brand or "") if r.device else ""
    if device_family == "Spider":
        cls = "bot"
    elif _CONSOLE_RE.search(ua):
        cls = "console"
    elif _TV_RE.search(ua) or "TV" in device_family:
        cls = "tv"
    elif _TABLET_RE.search(ua) or "Tablet" in brand or "tablet" in device_family.lower():
        cls = "tablet"
    elif os_family == "Android":
        # Android phones say "Mobile"; Android tablets mostly do not.
        cls = "mobile" if "Mobile" in ua else "tablet"
    elif os_family in MOBILE_OS or device_family in ("iPhone", "iPod", "Generic Smartphone"):
        cls = "mobile"
    elif os_family in DESKTOP_OS or (os_family or "").startswith("Windows"):
        cls = "desktop"
    else:
        cls = "unknown"
    return Device(browser, browser_version, os_family, os_version, cls)


# --- metadata tables --------------------------------------------------------------------------


def read_table_rows(path: str, data: bytes) -> Iterable[dict]:
    """Rows of one metadata file, by extension: .csv, .jsonl/.json (one object per line), .avro."""
    lower = path.lower()
    if lower.endswith(".avro"):
        yield from fastavro.reader(io.BytesIO(data))
    elif lower.endswith(".csv"):
        yield from csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    elif lower.endswith((".jsonl", ".json", ".ndjson")):
        for n, line in enumerate(data.splitlines(), 1):
            if line.strip():
                row = orjson.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: metadata rows must be JSON objects")
                yield row
    else:
        raise ValueError(f"{path}: metadata files must end in .csv, .jsonl or .avro")


def metadata_entry(row: dict, key: str) -> tuple[str, dict] | None:
    """A row -> (key, {column: text}) with every other column as a string; None without the key."""
    k = row.get(key)
    if k is None or k == "":
        return None
    return str(k), {c: str(v) for c, v in row.items() if c != key and v is not None}


class _TableRowsFn(beam.DoFn):
    def __init__(self, key: str, pseudonym_domain: str | None, key_source: KeySource):
        self._key, self._domain, self._key_source = key, pseudonym_domain, key_source
        self._no_key = Metrics.counter(METRICS_NS, "metadata_rows_without_key")

    def setup(self):
        self._pseudonymiser = Pseudonymiser(self._key_source.load()) if self._domain else None

    def process(self, readable_file):
        path = readable_file.metadata.path
        with readable_file.open(compression_type=CompressionTypes.AUTO) as f:
            data = read_all(f)
        for row in read_table_rows(path.removesuffix(".gz"), data):
            entry = metadata_entry(row, self._key)
            if entry is None:
                self._no_key.inc()
                continue
            k, values = entry
            if self._pseudonymiser:
                # Events carry the pseudonym, so the table is keyed by it too.
                k = self._pseudonymiser.pseudonym(self._domain, k)
            yield k, values


class ReadMetadataTable(beam.PTransform):
    """A glob of metadata files -> (key, {column: value}) pairs, for use as an AsDict side input.

    Args:
      path: file glob of the table (JSON lines, CSV or Parquet).
      key: the column holding the lookup key.
      pseudonym_domain: when the events carry a pseudonym of the key, its HMAC domain; else None.
      key_source: where the HMAC key comes from (read on the workers in setup).
    """

    def __init__(self, path: str, key: str, pseudonym_domain: str | None, key_source: KeySource):
        super().__init__()
        self._path, self._key, self._domain, self._key_source = path, key, pseudonym_domain, key_source

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[tuple[str, dict]]:
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._path)
            | "Open" >> fileio.ReadMatches()
            | "Rows" >> beam.ParDo(_TableRowsFn(self._key, self._domain, self._key_source))
        )


# --- the transform ----------------------------------------------------------------------------

LOOKUPS = (("item", "item_id"), ("user", "user_id"), ("experiment", "experiment_id"))


def enrich_event(event: dict, tables: dict) -> tuple[dict, list[str]]:
    """Adds device fields and metadata maps. Returns the new event and the lookups that missed."""
    out = dict(event)
    d = classify_device(event.get("user_agent"))
    out.update(
        browser=d.browser,
        browser_version=d.browser_version,
        os=d.os,
        os_version=d.os_version,
        device_class=d.device_class,
    )
    missed = []
    for name, field in LOOKUPS:
        table = tables.get(name)
        value = event.get(field)
        meta = None
        if table is not None and value is not None:
            meta = table.get(value)
            if meta is None:
                missed.append(name)
        out[f"{name}_meta"] = meta
    return out, missed


class _EnrichFn(beam.DoFn):
    def __init__(self):
        self._missing = {name: Metrics.counter(METRICS_NS, f"{name}_lookup_missing") for name, _ in LOOKUPS}

    def _enrich(self, event: dict, tables: dict) -> dict:
        out, missed = enrich_event(event, tables)
        for name in missed:
            self._missing[name].inc()
        return out

    def process(self, event: dict, items=None, users=None, experiments=None):
        yield self._enrich(event, {"item": items, "user": users, "experiment": experiments})


class _EnrichChunkFn(_EnrichFn):
    """As _EnrichFn, one list of events at a time (a list out per list in): Beam's side-input
    invocation is paid once per list."""

    def process(self, events: list, items=None, users=None, experiments=None):
        tables = {"item": items, "user": users, "experiment": experiments}
        yield [self._enrich(e, tables) for e in events]


@beam.typehints.with_input_types(dict)
class EnrichEvents(beam.PTransform):
    """Events -> events with device class and metadata.

    Args:
      tables: maps item/user/experiment to a PCollection of (key, metadata) pairs (ReadMetadataTable);
        a name is missing when no table is configured.
      chunked: the input holds lists of events (ProtectPrivacy(chunked=True)), and so does the output.
    """

    def __init__(self, tables: dict | None = None, chunked: bool = False):
        super().__init__()
        self._tables = tables or {}
        self._chunked = chunked
        if chunked:
            self.with_input_types(list[dict])

    def expand(self, events: beam.PCollection[dict]) -> beam.PCollection[dict]:
        side = {f"{name}s": beam.pvalue.AsDict(pc) for name, pc in self._tables.items()}
        fn = _EnrichChunkFn() if self._chunked else _EnrichFn()
        return events | "UserAgentAndMetadata" >> beam.ParDo(fn, **side)
