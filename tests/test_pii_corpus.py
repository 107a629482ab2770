"""Every value of a 47-format PII corpus, placed in every field and key of every kind of record, is
absent from every output of a real batch job (decoded: Avro, Parquet, JSON lines, JSON)."""

import io
import json

import fastavro
import pytest

from pipelines import batch
from tests.conftest import write_config
from tests.pii_scan import PII_CORPUS, T0_MS, pii_placements, scan_outputs

# Every place the corpus puts PII in, each with its own pii_found.<field>.<kind> counter.
PII_FIELDS = (
    "context context_key user_agent event_id item_id request_id policy experiment_id variant user_id session_id "
    "unknown_field field_name raw"
).split()


# Raw ids and PII hidden where dead-letter redaction must still find them (repeated keys, Avro bytes,
# malformed text, number tokens, long messages): searched for in every output beside the corpus.
HOSTILE_SECRETS = tuple(
    ("id", v)
    for v in "RAWUSERDUPKEY42 PYREPRUSER1 PYREPRSESS1 ESCKEYUSER2 SQUSER5 RAWBARE6 dup.first@example.com".split()
) + (("email", "trunc.person@example.com"), ("phone", "+1 415 555 0177"), ("email", "blob0.user@example.com"))
_T = f'"event_time":{T0_MS}'
HOSTILE_LINES = [
    ('{"event_id":"h1","event_type":"bogus",' + _T + ',"context":{"q":"dup.first@example.com","q":"x"}}'),
    ('{"event_id":"h2","event_type":"impression",' + _T + ',"user_id":"RAWUSERDUPKEY42","user_id":null}'),
    ('{"event_id":"+1 415 555 0177","event_id":"h3","event_type":"bogus",' + _T + "}"),
    "{'event_id': 'h4', 'event_type': 'click', 'user_id': 'PYREPRUSER1', 'session_id': 'PYREPRSESS1'}",
    '{"event_id": "h5", "user\\u005fid": "ESCKEYUSER2", "event_type": "click",',
    '{"event_id": "h6", "user_id": \'SQUSER5\', "event_type": "click"}',
    '{"event_id": "h7", "user_id": RAWBARE6, "event_type": "click"}',
    '{"event_id":"h8","event_type":"click",' + _T + ',"user_id":1e400}',
    '{"event_id":"h9","event_type":"impression",'
    + _T
    + ',"user_id":"u1","position":"'
    + "x" * 40
    + ' trunc.person@example.com"}',
]


def _foreign_avro() -> bytes:
    """An Avro file of an unregistered schema with a `bytes` field holding PII."""
    schema = {
        "type": "record",
        "name": "Foreign",
        "fields": [{"name": "event_id", "type": "string"}, {"name": "blob", "type": "bytes"}],
    }
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(schema), [{"event_id": "f0", "blob": b"blob0.user@example.com x"}])
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pii")
    lines = []
    for n, (_, value) in enumerate(PII_CORPUS):
        lines += pii_placements(value, n, T0_MS + n * 600_000)
    lines += [line.encode() for line in HOSTILE_LINES]
    (tmp / "in").mkdir()
    (tmp / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp / "in" / "b.avro").write_bytes(_foreign_avro())
    report = batch.run(
        [
            "--config",
            write_config(tmp, "quality: {mode: warn}\n"),
            "--input",
            str(tmp / "in" / "*"),
            "--output",
            str(tmp / "out"),
        ]
    )
    return report, tmp / "out", len(lines) + 1


def test_corpus_is_big_enough():
    assert len(PII_CORPUS) >= 40
    assert {k for k, _ in PII_CORPUS} == {"phone", "email", "ip"}


def test_scanner_finds_every_corpus_value_in_the_input(tmp_path):
    lines = [line for n, (_, value) in enumerate(PII_CORPUS) for line in pii_placements(value, n, T0_MS)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))
    assert scan_outputs(str(tmp_path)) == {"in.jsonl": sorted(v for _, v in PII_CORPUS)}


def test_no_corpus_value_in_any_output(corpus_run):
    report, out, n_lines = corpus_run
    assert report["accounting"]["holds"] and report["accounting"]["input_records"] == n_lines
    counts = report["counts"]
    for outcome in ("valid", "bots", "duplicates", "dead_letter", "consent_dropped"):
        assert counts[outcome] > 0, outcome
    assert report["labels"]["labels"] > 0 and report["labels"]["orphan_outcomes"] > 0
    assert scan_outputs(str(out), PII_CORPUS + HOSTILE_SECRETS) == {}


def test_pii_counted_and_compliance_reported(corpus_run):
    report, out, _ = corpus_run
    metrics = report["metrics"]
    for field in PII_FIELDS:
        assert any(k.startswith(f"feedback.privacy.pii_found.{field}.") for k in metrics), field
    privacy = json.loads((out / "quality.json").read_text())["privacy"]
    assert privacy["found"] > 0 and privacy["redacted"] == privacy["found"]
    assert privacy["compliance_rate"] == 1.0
    slo = {r["slo"]: r for r in report["quality"]["slos"]}["privacy_compliance"]
    assert slo["ok"] is True
    assert "Privacy" in (out / "report.html").read_text()
