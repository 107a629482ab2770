"""Quality end to end: the batch job's report.json/report.html, SLO exit codes, drift vs a baseline."""

import json

import orjson
import pytest

from feedback_tools.generate import generate
from pipelines import baseline, batch
from tests.conftest import write_config

N = 25_000  # effective sample size is users, not events: smaller reruns drift by chance


def shift_dwell(src, dst, factor):
    """A generated shift: every dwell 'factor' times longer (a client that logs dwell in the wrong unit)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        for line in f:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                g.write(line)
                continue
            if isinstance(obj, dict) and isinstance(obj.get("dwell_ms"), int) and obj["dwell_ms"] >= 0:
                obj["dwell_ms"] *= factor
                g.write(orjson.dumps(obj) + b"\n")
            else:
                g.write(line)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    # "same": the same population two days later. Two seeds would be two samples whose per-user
    # attributes (browser, OS) differ by chance, and a test must not depend on chance.
    generate(N, str(tmp / "base.jsonl"), seed=1, start="2026-11-01T00:00:00Z")
    generate(N, str(tmp / "same.jsonl"), seed=1, start="2026-11-03T00:00:00Z")
    shift_dwell(tmp / "same.jsonl", tmp / "shifted.jsonl", 8)
    cfg = write_config(tmp, "quality: {mode: warn}\n")
    batch.run(["--config", cfg, "--input", str(tmp / "base.jsonl"), "--output", str(tmp / "base_out")])
    assert (
        baseline.main(["--quality", str(tmp / "base_out" / "quality.json"), "--output", str(tmp / "baseline.json")])
        == 0
    )
    return tmp, cfg


def drift_of(tmp, cfg, name):
    report = batch.run(
        [
            "--config",
            cfg,
            "--input",
            str(tmp / f"{name}.jsonl"),
            "--output",
            str(tmp / f"{name}_out"),
            "--baseline",
            str(tmp / "baseline.json"),
        ]
    )
    return report["quality"]


def test_same_distribution_rerun_shows_no_drift(runs):
    q = drift_of(*runs, "same")
    assert q["drifted"] == [] or q["drifted"] is not None and "dwell_ms" not in str(q["drifted"])
    psi = {s["slo"]: s for s in q["slos"]}
    assert all(s["ok"] is not False for k, s in psi.items() if k.startswith("drift"))


def test_shifted_dwell_is_detected_as_drift(runs):
    q = drift_of(*runs, "shifted")
    assert "dwell_ms" in str(q["drifted"])
    assert any(s["slo"].startswith("drift") and s["ok"] is False for s in q["slos"])


def test_breach_exits_4_unless_warn_only(runs, capsys):
    tmp, _ = runs
    strict = write_config(tmp, "quality: {mode: fail}\n")
    args = ["--config", strict, "--input", str(tmp / "base.jsonl"), "--output", str(tmp / "strict_out")]
    assert batch.main(args) == 4  # 1.5% of the generated records are malformed on purpose
    assert "ingestion_success breached" in capsys.readouterr().err
    assert batch.main(args + ["--warn-only", "--overwrite"]) == 0
    report = json.load(open(tmp / "strict_out" / "report.json"))
    assert report["quality"]["breaches"] == ["ingestion_success"] and report["quality"]["mode"] == "warn"
    html = (tmp / "strict_out" / "report.html").read_text()
    assert html.count("<svg") >= 8 and "ingestion_success" in html
