"""Damaged and truncated input files: never a crash, never a silent loss.

What was read before the damage is kept; the unreadable rest of each file is ONE `corrupt_file` dead
letter naming the file, where reading stopped and the error; report.json lists the damaged files and
the accounting identity stays exact. The readers are checked alone for every codec, then the batch
job runs, as a user runs it, over damaged files of every kind beside good files.
"""

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import zlib

import fastavro
import pytest
import zstandard

from tests.conftest import SCHEMA_DIR, write_config
from tests.helpers import run_batch_process
from transforms import contract
from transforms.io import DAMAGE_FIELDS, StorageError, _CountingStream, read_avro, read_json_lines
from transforms.schemas import SchemaRegistry

T0 = 1_793_527_200_000  # 2026-11-01T10:00:00Z
SCHEMA = json.loads((SCHEMA_DIR / "event.v2.avsc").read_text())


def event(i: int) -> dict:
    # Impressions of 500 users, one per second overall (far below every bot rule); 10 per request.
    return {
        "event_id": f"e{i}",
        "event_type": "impression",
        "event_time": T0 + i * 1000,
        "user_id": f"u{i % 500}",
        "item_id": f"i{i % 97}",
        "request_id": f"r{i // 10}",
        "position": i % 10,
        "context": {"pad": "x" * (i % 40)},
    }


def jsonl(first: int, n: int) -> bytes:
    return b"".join(json.dumps(event(i)).encode() + b"\n" for i in range(first, first + n))


# Compressors, and an independent oracle: everything a fresh decompressor decodes from the given bytes.
CODECS = {
    "gz": (lambda d: gzip.compress(d), lambda c: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(c)),
    "bz2": (lambda d: bz2.compress(d, compresslevel=1), lambda c: bz2.BZ2Decompressor().decompress(c)),
    "xz": (lambda d: lzma.compress(d, preset=1), lambda c: lzma.LZMADecompressor().decompress(c)),
    "zst": (
        lambda d: zstandard.ZstdCompressor().compress(d),
        lambda c: zstandard.ZstdDecompressor().decompressobj().decompress(c),
    ),
    "deflate": (lambda d: zlib.compress(d), lambda c: zlib.decompressobj().decompress(c)),
}


def collect(gen):
    """A reader generator -> (items, Damage or None)."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


def read_lines(path, data):
    return collect(read_json_lines(path, _CountingStream(io.BytesIO(data))))


def avro_bytes(records, codec, sync_interval=8_000):
    buf = io.BytesIO()
    fastavro.writer(buf, SCHEMA, records, codec=codec, sync_interval=sync_interval)
    return buf.getvalue()


def readable_prefix(data: bytes) -> tuple:
    """(records fastavro reads before failing, whether it failed): the oracle for damaged Avro."""
    n = 0
    try:
        for _ in fastavro.reader(io.BytesIO(data)):
            n += 1
    except Exception:  # noqa: BLE001 - any decoding error is what we look for
        return n, True
    return n, False


def damage_block(data: bytes) -> tuple:
    """Garbage written over part of a block past the middle of an Avro file, at the first place where
    fastavro fails on it (a few bytes of damage can decode by chance). -> (bytes, records readable)."""
    for start in range(len(data) // 2, len(data) - 64, 37):
        damaged = data[:start] + bytes(range(200, 232)) + data[start + 32 :]
        n, failed = readable_prefix(damaged)
        if failed:
            return damaged, n
    raise AssertionError("no damage position made fastavro fail")


# --- the readers alone -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_truncated_compressed_file_keeps_the_readable_lines_and_says_where_it_stopped(suffix):
    compress, oracle = CODECS[suffix]
    whole = compress(jsonl(0, 10_000))
    cut = whole[: len(whole) // 2]
    expected = oracle(cut).count(b"\n")
    assert expected > 0
    items, damage = read_lines(f"/in/cut.jsonl.{suffix}", cut)
    assert [s for s, _ in items] == [f"/in/cut.jsonl.{suffix}:{n}" for n in range(1, expected + 1)]
    assert [json.loads(line)["event_id"] for _, line in items] == [f"e{i}" for i in range(expected)]
    assert damage is not None and damage.records_read == expected
    assert damage.file == f"/in/cut.jsonl.{suffix}" and damage.stopped_at == f"/in/cut.jsonl.{suffix}:{expected + 1}"
    assert damage.offset == len(cut) and "TruncatedStream" in damage.error


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_intact_compressed_file_reads_every_line_without_damage(suffix):
    compress, _ = CODECS[suffix]
    data = compress(jsonl(0, 3000)) + compress(jsonl(3000, 5))  # two members / streams / frames
    items, damage = read_lines(f"/in/ok.jsonl.{suffix}", data)
    assert damage is None and len(items) == 3005 and items[-1][0] == f"/in/ok.jsonl.{suffix}:3005"


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_file_that_is_not_compressed_as_named_is_one_damage_with_nothing_read(suffix):
    items, damage = read_lines(f"/in/plain.jsonl.{suffix}", jsonl(0, 50))
    assert items == [] and damage.records_read == 0 and damage.stopped_at == f"/in/plain.jsonl.{suffix}:1"
    assert damage.error


def test_empty_compressed_file_has_no_records_and_no_damage():
    assert read_lines("/in/empty.jsonl.gz", b"") == ([], None)


def test_gzip_with_a_damaged_block_stops_there():
    data = bytearray(gzip.compress(jsonl(0, 20_000)))
    data[len(data) // 2 : len(data) // 2 + 32] = bytes(32)
    items, damage = read_lines("/in/bad.jsonl.gz", bytes(data))
    assert damage is not None and damage.records_read == len(items) and damage.error


def test_counting_stream_never_reads_more_than_asked_and_refuses_damaged_lengths():
    data = bytes(range(256)) * (1 << 16)  # 16 MiB, more than one read chunk
    raw = _CountingStream(io.BytesIO(data), len(data))
    assert raw.read(10 << 20) == data[: 10 << 20] and raw.offset == 10 << 20
    assert raw.read(1 << 62) == data[10 << 20 :] and raw.read(5) == b""  # a huge length: capped, no allocation
    with pytest.raises(ValueError):
        raw.read(-57854006)


def test_storage_errors_are_not_taken_for_damage():
    class Failing(io.BytesIO):
        def read(self, size=-1):
            raise ConnectionResetError("peer went away")

    with pytest.raises(StorageError):
        collect(read_json_lines("/in/a.jsonl.gz", _CountingStream(Failing())))
    with pytest.raises(StorageError):
        collect(read_avro("/in/a.avro", _CountingStream(Failing()), SchemaRegistry.from_directory(str(SCHEMA_DIR))))


@pytest.mark.parametrize("codec", ["null", "deflate", "snappy"])
@pytest.mark.parametrize("damage_kind", ["block", "truncated"])
def test_damaged_avro_keeps_the_records_before_the_damage(codec, damage_kind, registry):
    data = avro_bytes([event(i) for i in range(3000)], codec)
    if damage_kind == "block":
        data, expected = damage_block(data)
    else:
        data = data[: len(data) // 2]
        expected, failed = readable_prefix(data)
        assert failed
    assert 0 < expected < 3000
    items, damage = collect(read_avro("/in/x.avro", _CountingStream(io.BytesIO(data)), registry))
    assert [s for s, _ in items] == [f"/in/x.avro#{n}" for n in range(1, expected + 1)]
    assert damage.records_read == expected and damage.stopped_at == f"/in/x.avro#{expected + 1}"
    assert 0 < damage.offset <= len(data) and damage.error


@pytest.mark.parametrize("codec", ["null", "deflate", "snappy"])
def test_damage_anywhere_in_an_avro_file_is_damage_never_an_exception(codec, registry, tmp_path):
    """Every byte of the header and first blocks, flipped two ways: the reader either reads the
    file or returns a Damage. Damaged lengths (negative, huge) included: they are not storage errors."""
    data = avro_bytes([event(i) for i in range(60)], codec, sync_interval=1_000)
    path = tmp_path / "x.avro"
    outcomes = set()
    for pos in range(0, min(len(data), 1200)):
        for flip in (0xFF, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= flip
            path.write_bytes(damaged)
            with open(path, "rb") as f:
                items, damage = collect(read_avro(str(path), _CountingStream(f, len(damaged)), registry))
            assert damage is None or damage.records_read == len(items)
            outcomes.add(damage is None)
    assert outcomes == {True, False}


def test_avro_that_is_not_avro_is_one_damage(registry):
    items, damage = collect(read_avro("/in/x.avro", _CountingStream(io.BytesIO(jsonl(0, 5))), registry))
    assert items == [] and damage.records_read == 0 and damage.stopped_at == "/in/x.avro#1"


# --- the batch job, run as a user runs it --------------------------------------------------------

GOOD = 2000


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
    """Good files beside damaged ones of every kind; one job over the whole folder."""
    tmp = tmp_path_factory.mktemp("damaged")
    inputs = tmp / "in"
    inputs.mkdir()
    (inputs / "good.jsonl").write_bytes(jsonl(0, GOOD))
    (inputs / "good.jsonl.gz").write_bytes(gzip.compress(jsonl(GOOD, GOOD)))
    expected = {}  # file name -> records readable before the damage
    first = 10_000
    for suffix, (compress, oracle) in sorted(CODECS.items()):
        whole = compress(jsonl(first, GOOD))
        cut = whole[: len(whole) // 2]
        (inputs / f"cut.jsonl.{suffix}").write_bytes(cut)
        expected[f"cut.jsonl.{suffix}"] = oracle(cut).count(b"\n")
        first += 10_000
    (inputs / "not-gzip.jsonl.gz").write_bytes(jsonl(first, 100))
    expected["not-gzip.jsonl.gz"] = 0
    for codec in ("null", "deflate", "snappy"):
        first += 10_000
        data, n = damage_block(avro_bytes([event(first + i) for i in range(GOOD)], codec))
        (inputs / f"damaged-{codec}.avro").write_bytes(data)
        expected[f"damaged-{codec}.avro"] = n
    first += 10_000
    cut = avro_bytes([event(first + i) for i in range(GOOD)], "deflate")
    (inputs / "cut-deflate.avro").write_bytes(cut[: len(cut) // 2])
    expected["cut-deflate.avro"] = readable_prefix(cut[: len(cut) // 2])[0]
    out = tmp / "out"
    r = run_batch_process(write_config(tmp), str(inputs / "*"), out)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    dead = [
        json.loads(line)
        for f in sorted(glob.glob(str(out / "dead_letter" / "*.jsonl")))
        for line in open(f)
        if line.strip()
    ]
    return r, report, dead, expected, inputs


def test_job_over_damaged_files_exits_0_with_exact_accounting(damaged_run):
    r, report, _, expected, _ = damaged_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(n > 0 for name, n in expected.items() if name != "not-gzip.jsonl.gz"), expected
    acc = report["accounting"]
    assert acc["holds"] and acc["difference"] == 0
    # Every readable record is kept (all are valid, distinct, human); each damaged file is one more input.
    assert report["counts"]["valid"] == 2 * GOOD + sum(expected.values())
    assert acc["input_records"] == 2 * GOOD + sum(expected.values()) + len(expected)
    assert report["dead_letter_by_reason"] == {contract.CORRUPT_FILE: len(expected)}


def test_each_damaged_file_is_one_corrupt_file_dead_letter_saying_where_and_why(damaged_run):
    _, _, dead, expected, inputs = damaged_run
    by_file = {}
    for d in dead:
        assert d["reason"] == contract.CORRUPT_FILE and d["stage"] == "read"
        by_file.setdefault(os.path.basename(d["file"]), []).append(d)
    assert sorted(by_file) == sorted(expected)
    for name, (d,) in by_file.items():
        sep = "#" if name.endswith(".avro") else ":"
        assert d["file"] == str(inputs / name)
        assert d["records_read"] == expected[name], name
        assert d["stopped_at"] == d["source"] == f"{inputs / name}{sep}{expected[name] + 1}"
        assert 0 < d["offset"] <= (inputs / name).stat().st_size and d["error"]
        assert d["error"] in d["message"]


def test_report_lists_the_damaged_files(damaged_run):
    r, report, dead, expected, inputs = damaged_run
    listed = report["damaged_files"]
    assert [os.path.basename(d["file"]) for d in listed] == sorted(expected)
    assert all(set(d) == set(DAMAGE_FIELDS) for d in listed)
    assert sorted(listed, key=lambda d: d["file"]) == sorted(
        ({k: d[k] for k in DAMAGE_FIELDS} for d in dead), key=lambda d: d["file"]
    )
    assert "damaged files" in r.stdout and "not-gzip.jsonl.gz:1" in r.stdout
