"""Every value of a 47-format PII corpus, placed in every field and key of every kind of record, is
absent from every output of a real batch job (decoded: Avro, Parquet, JSON lines, JSON)."""

import json

import pytest

from pipelines import batch
from tests.conftest import write_config
from tests.pii_scan import PII_CORPUS, T0_MS, pii_placements, scan_outputs

# Every place the corpus puts PII in, each with its own pii_found.<field>.<kind> counter.
PII_FIELDS = (
    "context context_key user_agent event_id item_id request_id policy experiment_id variant user_id session_id "
    "unknown_field field_name raw"
).split()


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pii")
    lines = []
    for n, (_, value) in enumerate(PII_CORPUS):
        lines += pii_placements(value, n, T0_MS + n * 600_000)
    (tmp / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = batch.run(
        [
            "--config",
            write_config(tmp, "quality: {mode: warn}\n"),
            "--input",
            str(tmp / "in.jsonl"),
            "--output",
            str(tmp / "out"),
        ]
    )
    return report, tmp / "out", len(lines)


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
    assert scan_outputs(str(out)) == {}


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
