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
AVRO_GZ = 30  # records of events.avro.gz
LONG_LINE_GOOD = 4  # good lines of long-line.jsonl.gz, beside its one oversize line


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
    # One bit flipped in the 4th snappy block: its CRC32 fails, the first 3 blocks are kept.
    first += 10_000
    data = avro_bytes([event(first + i) for i in range(GOOD)], "snappy")
    blocks = list(fastavro.block_reader(io.BytesIO(data)))
    flipped = bytearray(data)
    flipped[blocks[3].offset + blocks[3].size // 2] ^= 1
    (inputs / "bitflip-snappy.avro").write_bytes(bytes(flipped))
    expected["bitflip-snappy.avro"] = sum(b.num_records for b in blocks[:3])
    # Intact extras, at the times of good events (an hour of their own would breach the entropy SLO),
    # under other event ids: Avro inside gzip (read as Avro), and JSON lines with one 3 MB line.
    extra = [{**event(i), "event_id": f"x{i}"} for i in range(AVRO_GZ + LONG_LINE_GOOD)]
    (inputs / "events.avro.gz").write_bytes(gzip.compress(avro_bytes(extra[:AVRO_GZ], "null")))
    lines = [json.dumps(e).encode() + b"\n" for e in extra[AVRO_GZ:]]
    huge = b'{"event_id":"huge","pad":"' + b"x" * 3_000_000 + b'"}\n'
    (inputs / "long-line.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:2]) + huge + b"".join(lines[2:])))
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
    good = 2 * GOOD + AVRO_GZ + LONG_LINE_GOOD
    assert report["counts"]["valid"] == good + sum(expected.values())
    assert acc["input_records"] == good + sum(expected.values()) + len(expected) + 1
    assert report["dead_letter_by_reason"] == {contract.CORRUPT_FILE: len(expected), contract.OVERSIZE_PAYLOAD: 1}


def test_an_oversize_line_is_one_bounded_oversize_payload_dead_letter(damaged_run):
    _, _, dead, _, inputs = damaged_run
    (d,) = [d for d in dead if d["reason"] == contract.OVERSIZE_PAYLOAD]
    assert d["source"] == f"{inputs / 'long-line.jsonl.gz'}:3"
    assert d["raw_bytes"] <= 32769 and len(d["raw"]) < 40_000


def test_each_damaged_file_is_one_corrupt_file_dead_letter_saying_where_and_why(damaged_run):
    _, _, dead, expected, inputs = damaged_run
    by_file = {}
    for d in dead:
        if d["reason"] == contract.OVERSIZE_PAYLOAD:
            continue
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
        ({k: d[k] for k in DAMAGE_FIELDS} for d in dead if d["reason"] == contract.CORRUPT_FILE),
        key=lambda d: d["file"],
    )
    assert "damaged files" in r.stdout and "not-gzip.jsonl.gz:1" in r.stdout


# --- silent damage, Avro inside compression, huge lines, gzip padding -------------------------------


def bit_flips_in_blocks(data: bytes, stride: int):
    """Every `stride`-th byte after the header, one bit flipped: (position, damaged bytes)."""
    header_end = data.index(b"\x00", 200)  # well past the magic and metadata map's start
    for pos in range(header_end + 40, len(data) - 20, stride):
        damaged = bytearray(data)
        damaged[pos] ^= 1
        yield pos, bytes(damaged)


@pytest.mark.parametrize("codec", ["snappy", "bzip2", "xz"])
def test_a_flipped_bit_in_a_checksummed_avro_block_is_damage_never_different_records(codec, registry):
    """snappy blocks carry a CRC32 (Avro spec) that fastavro does not check; bzip2 and xz check their
    own. A flipped bit is a Damage with the records of the earlier blocks kept, or (a flip in a
    length or count that still decodes) the same records: never silently different ones."""
    records = [event(i) for i in range(300)]
    data = avro_bytes(records, codec, sync_interval=2_000)
    originals = [r for _, r in collect(read_avro("/in/x.avro", _CountingStream(io.BytesIO(data)), registry))[0]]
    damaged_seen = 0
    for pos, damaged in bit_flips_in_blocks(data, 97):
        items, damage = collect(read_avro("/in/x.avro", _CountingStream(io.BytesIO(damaged)), registry))
        got = [r for _, r in items]
        assert got == originals[: len(got)], (codec, pos)
        if damage is None:
            assert len(got) == len(originals), (codec, pos)
        else:
            damaged_seen += 1
            assert damage.records_read == len(got) < len(originals)
    assert damaged_seen > 0


def test_snappy_crc_mismatch_names_the_checksum(registry):
    data = bytearray(avro_bytes([event(i) for i in range(300)], "snappy", sync_interval=2_000))
    pos = data.rindex(b"impression")  # in the last block, uncompressed by snappy (a literal)
    data[pos + 9] ^= 1
    items, damage = collect(read_avro("/in/x.avro", _CountingStream(io.BytesIO(bytes(data))), registry))
    assert damage is not None and "CRC32" in damage.error
    assert 0 < damage.records_read == len(items) < 300
    assert all(r["event_type"] == "impression" for _, r in items)


@pytest.mark.parametrize("suffix", ["gz", "bz2", "zst"])
def test_avro_inside_a_compressed_file_is_read_as_avro_never_as_lines(suffix, registry):
    from transforms.io import read_file

    compress, _ = CODECS[suffix]
    data = compress(avro_bytes([event(i) for i in range(30)], "null"))
    items, damage = collect(read_file(f"/in/e.avro.{suffix}", _CountingStream(io.BytesIO(data)), registry))
    assert damage is None
    assert [s for s, _ in items] == [f"/in/e.avro.{suffix}#{n}" for n in range(1, 31)]
    assert [r["event_id"] for _, r in items] == [f"e{i}" for i in range(30)]
    # Cut short: what was read is kept, the rest is one Damage; never JSON "lines".
    items, damage = collect(
        read_file(
            "/in/e.avro.gz",
            _CountingStream(io.BytesIO(gzip.compress(avro_bytes([event(i) for i in range(3000)], "null"))[:20_000])),
            registry,
        )
    )
    assert damage is not None and damage.stopped_at == f"/in/e.avro.gz#{len(items) + 1}"
    assert all(isinstance(r, dict) for _, r in items)


def test_a_line_longer_than_the_limit_is_a_bounded_prefix_in_bounded_memory():
    from transforms.io import read_json_lines

    huge = b'{"x":"' + b"a" * 5_000_000 + b'"}'
    data = gzip.compress(jsonl(0, 2) + huge + b"\n" + jsonl(2, 2) + huge)  # the last one without newline
    items, damage = collect(read_json_lines("/in/a.jsonl.gz", _CountingStream(io.BytesIO(data)), max_line_bytes=1000))
    assert damage is None
    assert [s for s, _ in items] == [f"/in/a.jsonl.gz:{n}" for n in range(1, 7)]
    assert [len(line) for _, line in items][2] == 1001 and len(items[5][1]) == 1001
    assert items[2][1] == b'{"x":"' + b" " * 995  # cut back to a delimiter, padded over the limit
    assert [line for _, line in items][:2] == jsonl(0, 2).splitlines()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_bounded_line_splitter_agrees_with_split_in_any_chunking(chunk):
    from transforms.io import _LineSplitter

    data = b"ab\r\n" + b"x" * 20 + b"\n\nccc\r\n" + b"y" * 11 + b"\r\n" + b"z" * 9
    s, got = _LineSplitter(10), []
    for i in range(0, len(data), chunk):
        got += s.feed(data[i : i + chunk])
    got += s.close()
    assert got == [(1, b"ab"), (2, b" " * 11), (3, b""), (4, b"ccc"), (5, b" " * 11), (6, b"z" * 9)]
    assert s.oversize == 2 and s.longest == 20


def test_gzip_with_trailing_zero_padding_is_intact_like_gzip_t():
    data = gzip.compress(jsonl(0, 50)) + b"\0" * 3000
    items, damage = read_lines("/in/a.jsonl.gz", data)
    assert damage is None and len(items) == 50
    items, damage = read_lines("/in/a.jsonl.gz", gzip.compress(jsonl(0, 50)) + b"\0" * 10 + b"junk")
    assert damage is not None and len(items) == 50


def test_pii_in_a_damaged_file_name_is_masked_in_its_dead_letter():
    from transforms import io as tio

    name = "/in/jane.doe@example.com +14155550177.jsonl.gz"
    d = tio.damage_dead_letter(tio.Damage(name, name + ":3", 2, 10, f"EOFError: {name} ended early"))
    text = json.dumps(d)
    assert "jane.doe@example.com" not in text and "4155550177" not in text, text
    assert d["file"].startswith("/in/") and d["file"].endswith(".jsonl.gz") and d["stopped_at"].endswith(".jsonl.gz:3")
    assert d["records_read"] == 2 and d["offset"] == 10


def test_replaying_corrupt_file_dead_letters_keeps_them_as_they_are_accounted_once(damaged_run, tmp_path):
    """A corrupt_file dead letter has no record to replay: replay keeps it, with its details, as one
    input and one corrupt_file dead letter (it was turned into malformed_json "record is empty")."""
    from pipelines import replay

    _, report, dead, expected, inputs = damaged_run
    out = tmp_path / "replayed"
    cfg = write_config(tmp_path)
    dead_glob = str(inputs.parent / "out" / "dead_letter" / "*.jsonl")
    r = replay.run(["dead-letters", "--config", cfg, "--dead-letters", dead_glob, "--output", str(out)])
    assert r["accounting"]["holds"] and r["accounting"]["input_records"] == len(dead)
    assert r["dead_letter_by_reason"] == {contract.CORRUPT_FILE: len(expected), contract.OVERSIZE_PAYLOAD: 1}
    again = [json.loads(line) for f in sorted(glob.glob(str(out / "dead_letter" / "*.jsonl"))) for line in open(f)]
    corrupt = sorted((d for d in dead if d["reason"] == contract.CORRUPT_FILE), key=lambda d: d["file"])
    assert sorted((d for d in again if d["reason"] == contract.CORRUPT_FILE), key=lambda d: d["file"]) == corrupt


def test_an_oversize_prefix_never_ends_inside_a_value():
    """Redaction runs on what is kept: a prefix cut inside an e-mail ("jane@exampl") would no longer
    be recognised, so the prefix is cut back to the last JSON delimiter."""
    from transforms.io import _oversize_prefix

    line = b'{"user_id":"u1","note":"write to jane.doe@example.com today","pad":"' + b"x" * 500 + b'"}'
    cut_at = line.index(b"@example") + 3
    kept = _oversize_prefix(line, cut_at)
    assert len(kept) == cut_at + 1 and kept.rstrip(b" ").endswith(b'"note":"write to')
    assert b"jane" not in kept and b"@ex" not in kept


def test_a_damaged_length_inside_compressed_avro_is_refused_before_decompressing():
    from transforms.io import _ChunkReader

    def chunks():
        yield b"x" * 10
        raise AssertionError("decompressed for a damaged length")

    reader = _ChunkReader(b"Obj\x01", chunks(), _CountingStream(io.BytesIO(b"")))
    with pytest.raises(ValueError, match="damaged length"):
        reader.read(1 << 40)
    assert reader.read(4) == b"Obj\x01"
