"""Re-runs into a used output folder: one run per folder, staged and published with a manifest.

A second run never mixes with the first (refused, or --overwrite replaces it exactly); a killed run
leaves nothing that looks complete; readers refuse unpublished runs; no sink temp folders remain.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import fastavro
import pytest

from feedback_tools.generate import generate
from pipelines import batch, replay, runfolder
from tests.conftest import ROOT, write_config

FEATURES = "features:\n  windows:\n    - {size: 1h, period: 15m}\n"


def published_files(root):
    """Every file under root, relative, with its sha256."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def all_entries(root):
    return [os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files]


def avro_records(root, output):
    return sum(1 for f in glob.glob(os.path.join(root, output, "*.avro")) for _ in fastavro.reader(open(f, "rb")))


def jsonl_records(root, output):
    return sum(1 for f in glob.glob(os.path.join(root, output, "*.jsonl")) for line in open(f) if line.strip())


def assert_exactly_one_published_run(root, report):
    """The folder holds the manifest's files, the two markers and nothing else; counts match the report."""
    manifest = json.loads(open(os.path.join(root, runfolder.MANIFEST)).read())
    files = published_files(root)
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(files) == set(listed) | {runfolder.MANIFEST, runfolder.SUCCESS}
    assert all(files[p] == e["sha256"] for p, e in listed.items())
    assert manifest["run_id"] == report["run_id"] and manifest["counts"] == report["counts"]
    assert not [
        e
        for e in all_entries(root)
        if e.split(os.sep)[-1].startswith((".temp", "beam-temp", "_staging-", ".tmp", runfolder.RUNNING))
    ]
    counts = report["counts"]
    assert avro_records(root, "events") == counts["valid"] == manifest["records_by_output"]["events"]
    assert avro_records(root, "bots") == counts["bots"]
    assert jsonl_records(root, "duplicates") == counts["duplicates"]
    assert jsonl_records(root, "dead_letter") == counts["dead_letter"] + counts["too_late"]
    assert avro_records(root, "labels") == report["labels"]["labels"]
    return manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerun")
    generate(1500, str(tmp / "events.jsonl"), seed=11, start="2026-11-01T00:00:00Z")
    one = tmp / "one"
    one.mkdir()
    two = tmp / "two"
    two.mkdir()
    three_shards = write_config(two, FEATURES)
    with open(three_shards) as f:
        text = f.read().replace("output: {num_shards: 1}", "output: {num_shards: 3}")
    with open(three_shards, "w") as f:
        f.write(text)
    return tmp, write_config(one, FEATURES), three_shards


@pytest.fixture(scope="module")
def published(data):
    """One published run, copied by the tests that only need a used folder."""
    tmp, cfg1, _ = data
    assert run_batch(data, cfg1, tmp / "published") == 0
    return tmp / "published"


def copy_run(published_, dest):
    shutil.copytree(published_, dest)
    return dest


def run_batch(data_, cfg, out, *extra):
    tmp = data_[0]
    return batch.main(
        ["--config", cfg, "--input", str(tmp / "events.jsonl"), "--output", str(out), "--warn-only", *extra]
    )


def test_rerun_into_used_folder_is_refused_and_overwrite_replaces_it_exactly(data, capsys):
    tmp, cfg1, cfg3 = data
    out = tmp / "out"
    assert run_batch(data, cfg1, out) == 0
    first = published_files(out)
    report1 = json.loads((out / "report.json").read_text())
    assert_exactly_one_published_run(out, report1)
    assert glob.glob(str(out / "features" / "date=*" / "*.parquet"))
    capsys.readouterr()

    # A second run with another shard count: refused, and the folder is untouched.
    assert run_batch(data, cfg3, out) == 2
    err = capsys.readouterr().err
    assert "already holds a published batch run" in err and "--overwrite" in err and "Traceback" not in err
    assert published_files(out) == first

    assert run_batch(data, cfg3, out, "--overwrite") == 0
    report3 = json.loads((out / "report.json").read_text())
    manifest = assert_exactly_one_published_run(out, report3)
    shards = {os.path.basename(f).split("-of-")[-1] for f in glob.glob(str(out / "events" / "*.avro"))}
    assert shards == {"00003.avro"}  # only the new run's shards: none of the old single shard is left
    assert report3["counts"] == report1["counts"] and report3["run_id"] != report1["run_id"]
    assert manifest["job"] == "batch" and len(manifest["config_sha256"]) == 64


def test_failed_quality_gate_still_publishes_with_its_verdict(data):
    tmp, cfg1, _ = data
    out = tmp / "gated"
    (tmp / "gate").mkdir()
    strict = write_config(tmp / "gate", FEATURES + "quality: {mode: fail, slos: {ingestion_success_min: 0.99999}}\n")
    rc = batch.main(["--config", strict, "--input", str(tmp / "events.jsonl"), "--output", str(out)])
    manifest = json.loads((out / runfolder.MANIFEST).read_text())
    assert rc == 4 and (out / runfolder.SUCCESS).exists()
    assert manifest["quality"]["exit_code"] == 4 and "ingestion_success" in manifest["quality"]["breaches"]


def test_foreign_folder_is_never_deleted_even_with_overwrite(data, capsys):
    tmp, cfg1, _ = data
    out = tmp / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_batch(data, cfg1, out, "--overwrite") == 2
    assert "does not hold a run of this project" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out) == ["notes.txt"]


def test_overwrite_refuses_a_run_folder_with_files_no_manifest_lists(data, published, capsys):
    tmp, cfg1, _ = data
    out = copy_run(published, tmp / "extra")
    (out / "events" / "events-99999-of-99999.avro").write_bytes(b"someone else's")
    assert run_batch(data, cfg1, out, "--overwrite") == 2
    assert "no manifest of ours lists (events/events-99999-of-99999.avro)" in capsys.readouterr().err
    assert (out / runfolder.SUCCESS).exists()  # refused before anything was deleted


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_unusable_output_path_exits_2_before_the_pipeline(data, capsys, kind):
    tmp, cfg1, _ = data
    (tmp / "afile").write_text("x")
    out = tmp / "afile" if kind == "file" else tmp / "afile" / "out"
    assert run_batch(data, cfg1, out) == 2
    err = capsys.readouterr().err
    assert f"--output {out}" in err and ("is a file" in err or "cannot create the folder" in err)
    assert "Traceback" not in err


def test_half_published_run_is_removed_by_overwrite(data, published):
    """A run killed while moving files: some outputs in place, the rest and the manifest in staging."""
    tmp, cfg1, _ = data
    done = published
    half = tmp / "half"
    manifest = json.loads((done / runfolder.MANIFEST).read_text())
    staging = half / "_staging-20261101T000000Z-deadbeef"
    for i, e in enumerate(manifest["files"]):
        dest = (half if i % 2 else staging) / e["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(done / e["path"], dest)
    shutil.copy(done / runfolder.MANIFEST, staging / runfolder.MANIFEST)
    (half / runfolder.RUNNING).write_text("{}")
    moved = next(e["path"] for i, e in enumerate(manifest["files"]) if i % 2 and "/" in e["path"])
    with pytest.raises(runfolder.UnpublishedInputError, match="unpublished run"):
        runfolder.check_published(str(half / moved), "--archive")
    assert run_batch(data, cfg1, half) == 2
    assert run_batch(data, cfg1, half, "--overwrite") == 0
    assert_exactly_one_published_run(half, json.loads((half / "report.json").read_text()))


def test_readers_refuse_unpublished_or_changed_runs(data, published, capsys):
    tmp, cfg1, _ = data
    out = copy_run(published, tmp / "readers")
    events = str(out / "events" / "*.avro")
    assert runfolder.check_published(events, "--archive") == [str(out)]
    assert runfolder.verify_run(str(out)) == []
    (out / "events" / "events-00000-of-00001.avro").open("ab").write(b"x")  # changed after publication
    with pytest.raises(runfolder.UnpublishedInputError, match="different size"):
        runfolder.check_published(events, "--archive")
    assert runfolder.verify_run(str(out)) == ["events/events-00000-of-00001.avro: unreadable (EOFError)"]
    (out / runfolder.SUCCESS).unlink()
    args = [
        "archive",
        "--config",
        cfg1,
        "--archive",
        events,
        "--from",
        "2026-11-01T02:00:00Z",
        "--to",
        "2026-11-01T03:00:00Z",
        "--output",
        str(tmp / "replayed"),
    ]
    assert replay.main(args) == 2
    assert "unpublished run (no _SUCCESS" in capsys.readouterr().err
    assert not (tmp / "replayed").exists()
    with pytest.raises(runfolder.UnpublishedInputError, match="staging"):
        staging = out / "_staging-x" / "events"
        staging.mkdir(parents=True)
        (staging / "e.avro").write_bytes(b"")
        runfolder.check_published(str(out / "*" / "events" / "*.avro"), "--archive")


def test_killed_run_leaves_nothing_complete_and_overwrite_recovers(tmp_path):
    generate(3000, str(tmp_path / "events.jsonl"), seed=5, start="2026-11-01T00:00:00Z")
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.batch",
        "--config",
        cfg,
        "--input",
        str(tmp_path / "events.jsonl"),
        "--output",
        str(out),
        "--warn-only",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Mid-way: the pipeline is running once a sink has created its temp folder inside staging.
        while proc.poll() is None:
            stagings = glob.glob(str(out / "_staging-*"))
            if stagings and [e for e in all_entries(stagings[0]) if e != runfolder.RUNNING]:
                break
            time.sleep(0.02)  # polling for a state, not timing anything
        assert proc.poll() is None, "the job finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / runfolder.SUCCESS).exists() and not (out / runfolder.MANIFEST).exists()
    assert (out / runfolder.RUNNING).exists() and glob.glob(str(out / "_staging-*"))
    assert not glob.glob(str(out / "events" / "*"))  # readers' globs see nothing of the killed run

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "an unfinished run" in again.stderr
    again = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_one_published_run(out, json.loads((out / "report.json").read_text()))


def test_publish_leaves_out_sink_scratch_files_and_empty_temp_folders(tmp_path):
    folder = runfolder.prepare(str(tmp_path / "out"), "batch", overwrite=False)
    staging = tmp_path / "out" / os.path.basename(folder.staging)
    for rel, data in (
        ("events/events-00000-of-00001.jsonl", b'{"a": 1}\n{"a": 2}\n'),
        ("features/.temp-1234/part", b"x"),
        ("events/beam-temp-events-99/x", b"y"),
        ("labels/.tmp-labels-1.avro-abc", b"z"),
    ):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    (staging / "features" / ".temp-empty").mkdir()
    manifest = runfolder.publish(folder, "0" * 64, {"counts": {}})
    assert [e["path"] for e in manifest["files"]] == ["events/events-00000-of-00001.jsonl"]
    assert manifest["files"][0]["records"] == 2 and manifest["records_by_output"] == {"events": 2}
    assert sorted(all_entries(tmp_path / "out")) == [
        "_MANIFEST.json",
        "_SUCCESS",
        "events",
        os.path.join("events", "events-00000-of-00001.jsonl"),
    ]


def test_streaming_folder_refused_when_used_and_replaced_with_overwrite(tmp_path):
    from pipelines.streaming import STREAMING_OUTPUTS

    out = tmp_path / "stream"
    runfolder.prepare_streaming(str(out), False, STREAMING_OUTPUTS)
    (out / "labels").mkdir()
    (out / "labels" / "labels-20261101T000000Z-20261101T000500Z-pane0-00000-of-00001.avro").write_bytes(b"x")
    (out / "features" / ".temp-1").mkdir(parents=True)
    (out / "features" / ".temp-1" / "part").write_bytes(b"y")
    with pytest.raises(runfolder.OutputFolderError, match="already holds a streaming run's output"):
        runfolder.prepare_streaming(str(out), False, STREAMING_OUTPUTS)
    with pytest.raises(runfolder.OutputFolderError, match="already holds a streaming run's output"):
        runfolder.prepare(str(out), "batch", overwrite=False)  # batch and streaming refuse alike
    runfolder.prepare_streaming(str(out), True, STREAMING_OUTPUTS)
    assert all_entries(out) == [runfolder.STREAMING]


# --- a live run is never replaced; a run checks at publish that the folder is its own -----------------

HOLDER = """
import sys, json
from pipelines import runfolder
folder = runfolder.prepare(sys.argv[1], "batch", overwrite=False)
print(folder.run_id, flush=True)
sys.stdin.readline()  # hold the folder until told to publish
(__import__("pathlib").Path(folder.staging) / "events").mkdir(parents=True)
(__import__("pathlib").Path(folder.staging) / "events" / "e.jsonl").write_text('{"a": 1}\\n')
try:
    runfolder.publish(folder, "0" * 64, {"counts": {}})
except runfolder.RunFolderLostError as e:
    print(e, file=sys.stderr)
    sys.exit(5)
"""


def hold_folder(out):
    """A second real process that takes `out` (prepare) and publishes when a line arrives on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def test_overwrite_never_replaces_a_live_run_and_the_live_run_publishes(data, tmp_path):
    tmp, cfg1, _ = data
    out = tmp_path / "live"
    holder, run_id = hold_folder(out)
    try:
        assert run_id and holder.poll() is None, holder.stderr.read()
        cmd = [sys.executable, "-m", "pipelines.batch", "--config", cfg1, "--input", str(tmp / "events.jsonl")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for extra in ([], ["--overwrite"]):
            b = subprocess.run(
                cmd + ["--output", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
            )
            assert b.returncode == 2, b.stderr[-2000:]
            assert f"--output {out}" in b.stderr and run_id in b.stderr and "still running" in b.stderr
        assert json.loads((out / runfolder.RUNNING).read_text())["run_id"] == run_id
        _, err = holder.communicate("go\n", timeout=120)
        assert holder.returncode == 0, err
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert sorted(all_entries(out)) == ["_MANIFEST.json", "_SUCCESS", "events", os.path.join("events", "e.jsonl")]
    assert json.loads((out / runfolder.MANIFEST).read_text())["run_id"] == run_id


@pytest.mark.parametrize("taken", ["other_run", "cleared"])
def test_a_run_that_lost_its_folder_publishes_nothing(tmp_path, taken):
    out = tmp_path / "out"
    holder, run_id = hold_folder(out)
    try:
        if taken == "other_run":  # what an --overwrite of a (wrongly) stale marker would leave
            (out / runfolder.RUNNING).write_text(json.dumps({"run_id": "20261101T000000Z-other"}))
        else:
            shutil.rmtree(out / f"{runfolder.STAGING_PREFIX}{run_id}")
        _, err = holder.communicate("go\n", timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 5 and "no longer owns the folder" in err and "Nothing was published" in err
    assert not (out / runfolder.SUCCESS).exists() and not (out / runfolder.MANIFEST).exists()
    assert not (out / "events").exists()


def test_stale_running_markers_may_be_replaced(tmp_path):
    import datetime as dt
    import socket

    out = tmp_path / "out"
    out.mkdir()
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cases = [
        ({"host": socket.gethostname(), "pid": int(dead.stdout)}, None),  # dead pid here: stale
        ({"host": socket.gethostname(), "pid": os.getppid()}, "live"),  # our parent: alive
        ({"host": "elsewhere", "pid": 1, "started_at": "2026-11-30T11:00:00+00:00"}, "live"),  # within the lease
        ({"host": "elsewhere", "pid": 1, "started_at": "2026-11-28T11:00:00+00:00"}, None),  # lease over
        ({"job": "batch", "run_id": "old-format"}, None),  # no pid/host: a marker of an older version
    ]
    for marker, want in cases:
        (out / runfolder.RUNNING).write_text(json.dumps({"run_id": "r1", **marker}))
        got = runfolder.live_run(str(out), now=now)
        assert (got is not None) == (want == "live"), marker


@pytest.mark.parametrize("name", ["out[7]", "out*", "o?t"])
def test_output_with_glob_characters_exits_2_before_anything(data, tmp_path, capsys, name):
    out = tmp_path / name
    assert run_batch(data, data[1], out) == 2
    err = capsys.readouterr().err
    assert "glob character" in err and str(out) in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["folder", "glob_of_folders", "unreadable"])
def test_input_that_is_not_readable_files_exits_2_before_anything(data, tmp_path, capsys, kind, monkeypatch):
    _, cfg1, _ = data
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.jsonl").write_text("{}\n")
    pattern = {"folder": str(src), "glob_of_folders": str(src / "s*"), "unreadable": str(src / "*.jsonl")}[kind]
    if kind == "unreadable":
        os.chmod(src / "a.jsonl", 0)
        # Tests may run as root, for whom mode 0 is readable: the permission check is what is simulated.
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if str(p).endswith("a.jsonl") else real_access(p, mode, **kw)
        )
    out = tmp_path / "out"
    code = batch.main(["--config", cfg1, "--input", pattern, "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    # Beam's local glob lists files only: a glob of folders matches nothing (also exit 2 at start-up).
    assert "--input" in err and ("folders" in err or "cannot read" in err or "no file matches" in err)
    assert not out.exists()
