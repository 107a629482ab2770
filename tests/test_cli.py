"""The commands a user types, run as a user runs them (subprocesses, exit codes, messages)."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def run(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_demo(events: int, workdir):
    """README command 1 as a user types it: no HMAC key in the environment (the demo key is used)."""
    env = {k: v for k, v in os.environ.items() if k != "FEEDBACK_HMAC_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "feedback_tools.demo", "--events", str(events), "--workdir", str(workdir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_command(tmp_path):
    r = run_demo(3000, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accounting identity holds: True" in r.stdout
    assert "counts equal the generator's ground truth: True" in r.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["feedback.read.records"] == 3000
    # Run twice in a row: the demo replaces its previous run in sample/out (--overwrite), never mixes.
    r = run_demo(1000, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    manifest = json.loads((tmp_path / "out" / "_MANIFEST.json").read_text())
    assert report["metrics"]["feedback.read.records"] == 1000 and manifest["run_id"] == report["run_id"]
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_batch_refuses_bad_config_with_key_path(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bots:\n  max_events_per_minute: -3\n  sesion_gap: 5m\n")
    (tmp_path / "x.jsonl").write_text("{}\n")
    r = run(
        "pipelines.batch", "--config", str(cfg), "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o")
    )
    assert r.returncode == 2
    assert "bots.max_events_per_minute" in r.stderr and "bots.sesion_gap: unknown key" in r.stderr
    assert "session_gap" in r.stderr  # the allowed keys are listed


def test_batch_refuses_to_start_without_hmac_key(tmp_path):
    (tmp_path / "x.jsonl").write_text("{}\n")
    env = {"FEEDBACK_HMAC_KEY": ""}
    r = run(
        "pipelines.batch",
        "--config",
        "config/batch.yaml",
        "--input",
        str(tmp_path / "x.jsonl"),
        "--output",
        str(tmp_path / "o"),
        env_extra=env,
    )
    assert r.returncode == 2 and "no HMAC key" in r.stderr


def test_schema_check_command():
    r = run("pipelines.schema_check", "check")
    assert r.returncode == 0 and "v2 is backward compatible with v1" in r.stdout


def test_prism_runs_get_the_no_split_experiment():
    """Every job launched on Prism turns off its stateful bundle splitting (apache/beam#35771): with it
    on, Prism lost and repeated labels (pipelines/launcher.py)."""
    from apache_beam.options.pipeline_options import DebugOptions

    from pipelines.launcher import PRISM_NO_SPLIT_EXPERIMENT, pipeline_options

    prism = pipeline_options(["--runner=PrismRunner", "--experiments=other"]).view_as(DebugOptions).experiments
    assert PRISM_NO_SPLIT_EXPERIMENT in prism and "other" in prism
    assert not (pipeline_options([]).view_as(DebugOptions).experiments or [])


def test_records_are_spread_over_workers_unless_one_worker_runs_everything():
    """The read's record shuffle is left out only where nothing can be spread: FnApiRunner with one worker."""
    from pipelines.launcher import pipeline_options, single_worker

    assert single_worker(pipeline_options([]))  # the default runner
    assert not single_worker(pipeline_options(["--direct_num_workers=2"]))
    for runner in ("PrismRunner", "FlinkRunner", "DataflowRunner", "DirectRunner"):
        assert not single_worker(pipeline_options([f"--runner={runner}"])), runner
