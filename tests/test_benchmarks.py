"""Every script in benchmarks/ runs once on a tiny input, so none can rot. No timing assertions:
the figures belong in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"

# Script -> its arguments for a tiny run ({work}: a temporary folder, {data}: a tiny generated input).
TINY_ARGS = {
    "batch_throughput.py": ["--sizes", "150", "300", "--runners", "fnapi", "--workdir", "{work}"],
    # starts its own standalone Flink cluster (JobManager + 2 TaskManagers); tools from .ci/install-flink
    "flink_scale.py": ["--events", "1500", "--files", "2", "--workdir", "{work}"],
    # the streaming graph on Prism (tools from .ci/install-prism) over 300 events spanning 6 hours
    "label_latency.py": ["--events", "300", "--hours", "6", "--step", "1800", "--workdir", "{work}"],
    "memory_by_stage.py": ["--events", "150", "--workdir", "{work}", "--top", "3"],
    "pii_redaction.py": ["300"],
    "profile_job.py": ["--events", "150", "--workdir", "{work}", "--top", "5"],
    "reference.py": ["--input", "{data}", "--output", "{work}/reference"],
}


def _env() -> dict:
    return {
        **os.environ,
        "FEEDBACK_HMAC_KEY": "test-benchmark-key",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def test_every_benchmark_script_has_a_tiny_run():
    scripts = sorted(p.name for p in BENCH.glob("*.py"))
    assert scripts and sorted(TINY_ARGS) == scripts


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("bench-input") / "events.jsonl"
    subprocess.run(
        [sys.executable, "-m", "feedback_tools.generate", "--events", "150", "--output", str(data)],
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
    )
    return data


@pytest.mark.parametrize("script", sorted(TINY_ARGS))
def test_benchmark_script_runs_on_a_tiny_input(script, tmp_path, tiny_input):
    args = [a.format(work=tmp_path, data=tiny_input) for a in TINY_ARGS[script]]
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "batch_throughput.py":
        result = json.loads(proc.stdout)
        for run in result["runs"]:
            job = run["job_fnapi"]
            assert job["accounting_holds"] and job["same_counts_as_reference"], run
        assert set(result["job_fnapi"]) >= {
            "cpu_us_per_event",
            "fixed_cpu_s",
            "rss_kib_per_event",
            "ratio_to_reference",
        }
        assert set(result["grouped_passthrough_fnapi"]) >= {"cpu_us_per_event", "rss_kib_per_event"}
    if script == "memory_by_stage.py":
        result = json.loads(proc.stdout[proc.stdout.index("{") :])
        assert result["stages"] > 10 and result["largest_growth"], result
    if script == "flink_scale.py":
        result = json.loads(proc.stdout[proc.stdout.index("{") :])
        assert result["accounting_exact"] and sum(result["counts"].values()) == 1500, result
    if script == "label_latency.py":
        result = json.loads(proc.stdout)
        # every label emitted is measured, each against a step the probe saw pass
        assert result["labels"] > 0 and result["processing_ms"]["n"] == result["labels"], result
        assert result["labels_before_first_probe"] == 0 and result["probes_fired"] == result["steps"], result
    if script == "reference.py":
        summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
        assert summary["accounting_holds"] and sum(summary["counts"].values()) == 150
