"""The pipelines on real engines: Prism and Apache Flink, against FnApiRunner and the batch job.

* Batch job on Prism, on an embedded Flink (``--flink_master=[local]``) and on a standalone Flink
  cluster: report counts and accounting equal FnApiRunner's, and every output (events, bots,
  dead_letter, labels, slates, duplicates, consent_dropped, orphan and late outcomes) holds the
  same multiset of records (canonicalised: Avro timestamps as epoch ms, JSON keys sorted), over
  ``generate(3000)`` with an arrival-time envelope (too-late and late-outcome rules exercised).
* Streaming graph with TestStream (``tests/helpers.py``'s SCENARIO, stream builder and parity assertions) on Prism
  and on Flink: labels, orphan/late outcomes, dead letters and the archive equal the batch job's.
  On Prism it also runs with the watermark jumping straight to infinity: unlike
  BundleBasedDirectRunner (shared/BEAM-NOTES.md), Prism delivers output from timers that fire only
  at that jump.

* Batch and replay jobs on Flink with the standard flags (``--runner=FlinkRunner --flink_master=...
  --flink_job_server_jar=...``): embedded (``[local]``) and a standalone Flink 1.20.3 cluster
  (JobManager + 2 TaskManagers, separate processes, parallelism 2); outputs equal FnApiRunner's.
* Recovery: one TaskManager SIGKILLed in the middle of a batch job on the cluster; the restart
  strategy reruns the job on the surviving TaskManager and every output equals the uninterrupted run.

Engines come from ``.ci/install-prism`` / ``.ci/install-flink`` (``tests/engines.py``); a missing
tool or download fails these tests, it never skips them. SDK harness: LOOPBACK (this process).
"""

import collections
import datetime as dt
import glob
import json
import os
import time

import fastavro
import pytest

from feedback_tools.generate import generate
from pipelines import batch
from pipelines.graph import GraphSettings
from tests.conftest import FN_API_RUNNER, write_config
from tests.engines import *  # noqa: F401,F403 - pytest fixtures
from tests.engines import flink_options, portable_options, prism_options
from tests.helpers import (
    SCENARIO,
    SCENARIO_EXPOSURES,
    assert_counts_balance,
    assert_streaming_equals_batch,
    avro_rows,
    canonical_labels,
    run_batch,
    run_streaming_on,
)
from transforms.config import load_config

pytestmark = pytest.mark.slow

N_EVENTS = 3000
TIME_CONFIG = "time: {arrival_field: arrival_time, lateness: 1h}\n"
AVRO_OUTPUTS = ("events", "bots", "labels", "slates")
JSONL_OUTPUTS = ("dead_letter", "duplicates", "consent_dropped", "orphan_outcomes", "late_outcomes")
# Report fields that describe the run, not the data.
RUN_FIELDS = {"output", "run_id", "runner", "started_at", "elapsed_seconds", "outputs", "metrics"}
# The generated events' first hours (generate() starts at its default start time), for archive replays.
ARCHIVE_FROM, ARCHIVE_TO = "2026-11-01T00:00:00Z", "2026-11-01T06:00:00Z"


# --- canonical records ---------------------------------------------------------------------


def _canonical(value):
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def output_records(out_dir, name) -> collections.Counter:
    """The multiset of records in one batch output folder, each as canonical JSON."""
    files = sorted(f for f in glob.glob(os.path.join(str(out_dir), name, "*")) if os.path.getsize(f))
    if name in AVRO_OUTPUTS:
        rows = [r for f in files for r in fastavro.reader(open(f, "rb"))]
    else:
        rows = [json.loads(line) for f in files for line in open(f) if line.strip()]
    return collections.Counter(json.dumps(_canonical(r), sort_keys=True) for r in rows)


def assert_same_outputs(reference_dir, engine_dir):
    problems = []
    for name in AVRO_OUTPUTS + JSONL_OUTPUTS:
        want, got = output_records(reference_dir, name), output_records(engine_dir, name)
        if want != got:
            missing, extra = want - got, got - want
            problems.append(
                f"{name}: {sum(want.values())} records expected, {sum(got.values())} found; "
                f"{sum(missing.values())} missing (e.g. {next(iter(missing), None)}), "
                f"{sum(extra.values())} unexpected (e.g. {next(iter(extra), None)})"
            )
    assert not problems, "\n".join(problems)


def assert_same_report(reference: dict, engine: dict, metrics_required: bool):
    def strip(r):
        out = {k: v for k, v in r.items() if k not in RUN_FIELDS}
        if "quality" in out:  # the report.html path names the run's own output folder
            out["quality"] = {k: v for k, v in out["quality"].items() if k != "html"}
        return out

    assert strip(engine) == strip(reference)
    if metrics_required or engine["metrics"]:
        assert engine["metrics"] == reference["metrics"]


# --- batch ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """3000 generated events, the job config, and the FnApiRunner run of the batch job (reference)."""
    tmp = tmp_path_factory.mktemp("engines")
    generate(N_EVENTS, str(tmp / "events.jsonl.gz"), seed=11, arrival_field="arrival_time")
    cfg = write_config(tmp, TIME_CONFIG)
    argv = ["--config", cfg, "--input", str(tmp / "events.jsonl.gz")]
    reference = batch.run(argv + ["--output", str(tmp / "fnapi"), f"--runner={FN_API_RUNNER}"])
    assert reference["accounting"]["holds"] and reference["counts"]["too_late"] > 0
    return {"tmp": tmp, "argv": argv, "reference": reference, "reference_dir": tmp / "fnapi"}


def run_batch_on(generated, name, beam_args, argv=None):
    out = generated["tmp"] / name
    started = time.monotonic()
    report = batch.run((argv or generated["argv"]) + ["--output", str(out), *beam_args])
    print(f"\nbatch job on {name}: {time.monotonic() - started:.1f} s")
    return report, out


def test_batch_on_prism_equals_fnapi(generated, prism_binary):
    report, out = run_batch_on(generated, "prism", prism_options(prism_binary))
    assert report["runner"] == "PrismRunner"
    assert_same_report(generated["reference"], report, metrics_required=True)
    assert_same_outputs(generated["reference_dir"], out)


def test_standalone_flink_cluster_runs(flink_cluster):
    """The standalone cluster: a JobManager and two TaskManagers, each its own process."""
    overview = flink_cluster.overview()
    assert overview["flink-version"] == "1.20.3"
    assert overview["taskmanagers"] == 2 and overview["slots-total"] == 4
    pids = {p.pid for p in flink_cluster.processes.values()}
    assert len(pids) == 3 and os.getpid() not in pids


def test_batch_on_embedded_flink_equals_fnapi(generated, flink_job_server_jar):
    report, out = run_batch_on(
        generated, "flink-local", flink_options(flink_job_server_jar, "[local]", "--parallelism=2")
    )
    assert report["runner"] == "FlinkRunner"
    assert_same_report(generated["reference"], report, metrics_required=False)
    assert_same_outputs(generated["reference_dir"], out)


def new_jobs(cluster, before: set) -> list:
    return [j for j in cluster.jobs() if j["jid"] not in before]


def assert_ran_on_cluster(cluster, before: set, parallelism: int = 2) -> dict:
    """Exactly one new job, FINISHED, whose parallel operators ran with `parallelism` subtasks."""
    ran = new_jobs(cluster, before)
    assert [j["state"] for j in ran] == ["FINISHED"], ran
    job = cluster.job(ran[0]["jid"])
    assert max(v["parallelism"] for v in job["vertices"]) == parallelism, [v["parallelism"] for v in job["vertices"]]
    return job


def test_batch_on_flink_cluster_equals_fnapi(generated, flink_job_server_jar, flink_cluster):
    before = {j["jid"] for j in flink_cluster.jobs()}
    report, out = run_batch_on(
        generated, "flink-cluster", flink_options(flink_job_server_jar, flink_cluster.master, "--parallelism=2")
    )
    assert_ran_on_cluster(flink_cluster, before)
    assert_same_report(generated["reference"], report, metrics_required=False)
    assert_same_outputs(generated["reference_dir"], out)


# Flink's streaming (DataStream) translation of the bounded batch job: bundles of at most
# --max_bundle_size elements instead of one bundle per partition (at scale it still runs out of
# TaskManager heap: benchmarks/RESULTS.md, "Flink scale"). It needs runner-sharded sinks (`output.num_shards: 0`): a
# fixed shard count goes through WriteToText/WriteToAvro, which this translation rejects
# (transforms/io.py, WriteSingleFile). Same records and report as FnApiRunner's run with one shard.
DATA_STREAM_FOR_BATCH = "--use_data_stream_for_batch"


@pytest.fixture(scope="module")
def unsharded_argv(generated):
    cfg = write_config(generated["tmp"], TIME_CONFIG, num_shards=0, name="job-unsharded.yaml")
    return ["--config", cfg, *generated["argv"][2:]]


def assert_same_report_unsharded(reference: dict, engine: dict):
    """The report of a run with `unsharded_argv` against the reference's: it names another config, and
    its `feedback.write.files` counts the files the runner's bundles gave (the reference's fixed-shard
    sinks count none)."""
    metrics = {k: v for k, v in engine["metrics"].items() if k != "feedback.write.files"}
    assert_same_report(reference, {**engine, "config": reference["config"], "metrics": metrics}, metrics_required=False)


def test_batch_data_stream_on_embedded_flink_equals_fnapi(generated, unsharded_argv, flink_job_server_jar):
    options = flink_options(flink_job_server_jar, "[local]", "--parallelism=2", DATA_STREAM_FOR_BATCH)
    report, out = run_batch_on(generated, "flink-local-data-stream", options, unsharded_argv)
    assert_same_report_unsharded(generated["reference"], report)
    assert_same_outputs(generated["reference_dir"], out)


def test_batch_data_stream_on_flink_cluster_equals_fnapi(
    generated, unsharded_argv, flink_job_server_jar, flink_cluster
):
    before = {j["jid"] for j in flink_cluster.jobs()}
    options = flink_options(flink_job_server_jar, flink_cluster.master, "--parallelism=2", DATA_STREAM_FOR_BATCH)
    report, out = run_batch_on(generated, "flink-cluster-data-stream", options, unsharded_argv)
    assert_ran_on_cluster(flink_cluster, before)
    assert_same_report_unsharded(generated["reference"], report)
    assert_same_outputs(generated["reference_dir"], out)


def tree_digests(root) -> dict:
    """sha256 of every file under `root` except the run's own report, manifest and _SUCCESS (they name
    folders, run ids and times); the counters file (a plain runner-ordered WriteToText, not a replay
    output) by its sorted lines."""
    import hashlib

    def digest(path):
        data = open(path, "rb").read()
        if "/_counts/" in path:
            data = b"\n".join(sorted(data.splitlines()))
        return hashlib.sha256(data).hexdigest()

    return {
        os.path.relpath(f, root): digest(f)
        for f in glob.glob(os.path.join(str(root), "**", "*"), recursive=True)
        if os.path.isfile(f) and not f.endswith(("report.json", "_MANIFEST.json", "_SUCCESS")) and "/_replay/" not in f
    }


@pytest.mark.parametrize("mode", ["archive", "dead-letters"])
def test_replay_on_flink_cluster_equals_fnapi(generated, flink_cluster_job_server, flink_cluster, mode):
    """Replays write deterministic files: the cluster's must be byte-identical to FnApiRunner's."""
    from pipelines import replay

    ref = generated["reference_dir"]
    cfg = generated["argv"][1]
    if mode == "archive":
        args = [
            "archive",
            "--config",
            cfg,
            "--archive",
            str(ref / "events" / "*.avro"),
            "--from",
            ARCHIVE_FROM,
            "--to",
            ARCHIVE_TO,
        ]
    else:
        args = ["dead-letters", "--config", cfg, "--dead-letters", str(ref / "dead_letter" / "*")]
    tmp = generated["tmp"]
    want = replay.run(args + ["--output", str(tmp / f"replay-{mode}-fnapi"), f"--runner={FN_API_RUNNER}"])
    before = {j["jid"] for j in flink_cluster.jobs()}
    got = replay.run(
        args
        + [
            "--output",
            str(tmp / f"replay-{mode}-flink"),
            *portable_options(flink_cluster_job_server, "--parallelism=2"),
        ]
    )
    assert_ran_on_cluster(flink_cluster, before)
    drop = {"output", "run_id", "runner", "elapsed_seconds", "metrics", "replayability"}
    assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in want.items() if k not in drop}
    if mode == "archive":
        assert want["labels"]["labels"] > 0
    else:
        assert (
            want["accounting"]["input_records"]
            == generated["reference"]["counts"]["dead_letter"] + generated["reference"]["counts"]["too_late"]
        )
    digests = tree_digests(tmp / f"replay-{mode}-fnapi")
    assert digests and tree_digests(tmp / f"replay-{mode}-flink") == digests


def _runs_on_both_taskmanagers(cluster, jid: str) -> bool:
    """Some operator of the job that processes data (not a source or sink) has subtasks RUNNING on two
    TaskManagers at once: killing either now loses work in flight."""
    for v in cluster.job(jid)["vertices"]:
        if v["status"] != "RUNNING" or v["name"].startswith(("DataSource", "DataSink")):
            continue
        tms = cluster._get(f"/jobs/{jid}/vertices/{v['id']}/taskmanagers")["taskmanagers"]
        if sum(1 for tm in tms if tm["status-counts"].get("RUNNING", 0) > 0) >= 2:
            return True
    return False


def test_batch_survives_a_killed_taskmanager(generated, flink_cluster_job_server, flink_cluster):
    """SIGKILL one TaskManager while the batch job runs on both; Flink's restart strategy reruns the job
    on the surviving TaskManager (2 slots) and the outputs equal the uninterrupted run's exactly.
    The job runs in this (main) thread -- Beam's job server launcher installs a signal handler -- and a
    watcher thread does the killing."""
    import threading

    before = {j["jid"] for j in flink_cluster.jobs()}
    killed, done = [], threading.Event()

    def kill_when_both_busy():
        while not done.is_set():
            try:
                ran = new_jobs(flink_cluster, before)
                if ran and ran[0]["state"] == "RUNNING" and _runs_on_both_taskmanagers(flink_cluster, ran[0]["jid"]):
                    # Both TaskManagers are processing the job's data: kill the most recently started one.
                    victim = flink_cluster.taskmanager_names()[-1]
                    flink_cluster.kill_taskmanager(victim)
                    killed.append(victim)
                    return
            except (OSError, KeyError):  # REST briefly unavailable, or a vertex not yet deployed
                pass
            done.wait(0.2)

    watcher = threading.Thread(target=kill_when_both_busy, daemon=True)
    watcher.start()
    try:
        report = batch.run(
            generated["argv"]
            + [
                "--output",
                str(generated["tmp"] / "flink-recovery"),
                *portable_options(flink_cluster_job_server, "--parallelism=2"),
            ]
        )
    finally:
        done.set()
        watcher.join(30)
        if killed:  # back to two TaskManagers for the tests that follow
            flink_cluster.start_taskmanager()
    assert killed, "the job finished before it ran on both TaskManagers at once: nothing was killed"
    ran = new_jobs(flink_cluster, before)
    assert [j["state"] for j in ran] == ["FINISHED"], ran
    history = flink_cluster.job_exceptions(ran[0]["jid"])["exceptionHistory"]["entries"]
    assert history, "Flink recorded no failure: the kill did not interrupt the job"
    assert_same_report(generated["reference"], report, metrics_required=False)
    assert_same_outputs(generated["reference_dir"], generated["tmp"] / "flink-recovery")


# --- streaming graph under TestStream --------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """tests/helpers.py's scenario through the batch job (FnApiRunner): the reference."""
    tmp = tmp_path_factory.mktemp("engines-stream")
    cfg_path = write_config(tmp, "time: {arrival_field: arrival_time}\n")
    cfg = load_config(cfg_path)
    report, batch_out = run_batch(tmp, SCENARIO, cfg_path)
    return {"tmp": tmp, "cfg": cfg, "settings": GraphSettings.from_config(cfg), "batch_out": batch_out}


def assert_stream_equals_batch(scenario, stream_out):
    labels = canonical_labels(avro_rows(str(stream_out / "labels" / "**" / "*.avro")))
    exposures = sum(1 for e, _ in SCENARIO if e["event_type"] == "impression")
    assert len(labels) == exposures == SCENARIO_EXPOSURES, [l["label_id"] for l in labels]
    assert_streaming_equals_batch(scenario["batch_out"], stream_out)
    assert_counts_balance(stream_out, len(SCENARIO), SCENARIO_EXPOSURES)


@pytest.mark.parametrize("step_watermark", [True, False], ids=["stepped-watermark", "straight-to-infinity"])
def test_streaming_on_prism_equals_batch(scenario, prism_binary, step_watermark):
    out = scenario["tmp"] / f"prism-{step_watermark}"
    run_streaming_on(
        prism_options(prism_binary), scenario["settings"], scenario["cfg"], SCENARIO, out, step_watermark=step_watermark
    )
    assert_stream_equals_batch(scenario, out)


def test_streaming_on_flink_equals_batch(scenario, flink_cluster_job_server):
    out = scenario["tmp"] / "flink"
    run_streaming_on(
        portable_options(flink_cluster_job_server, "--parallelism=2"),
        scenario["settings"],
        scenario["cfg"],
        SCENARIO,
        out,
    )
    assert_stream_equals_batch(scenario, out)
