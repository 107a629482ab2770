"""Replay and backfill: deterministic, overlap-safe archive replay; dead letters re-processed once."""

import glob
import hashlib
import json
import os

import fastavro
import pytest

from feedback_tools.generate import generate
from pipelines import batch, replay
from tests.conftest import write_config


def file_digests(root):
    return {
        os.path.relpath(f, root): hashlib.sha256(open(f, "rb").read()).hexdigest()
        for f in glob.glob(os.path.join(root, "**", "*.*"), recursive=True)
        if os.path.isfile(f) and not f.endswith(("report.json", "_MANIFEST.json"))
    }  # both name their run


def label_ids(root):
    return [
        r["label_id"]
        for f in sorted(glob.glob(os.path.join(root, "labels", "**", "*.avro"), recursive=True))
        for r in fastavro.reader(open(f, "rb"))
    ]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    generate(6000, str(tmp / "events.jsonl"), seed=3, start="2026-11-01T00:00:00Z")
    cfg = write_config(tmp)
    out = tmp / "batch"
    report = batch.run(["--config", cfg, "--input", str(tmp / "events.jsonl"), "--output", str(out)])
    # The batch job's events output has the archive's schema (clean events with arrival time).
    return tmp, cfg, out, report


def test_archive_replay_matches_batch_and_is_byte_identical(archive):
    tmp, cfg, out, _ = archive
    args = [
        "archive",
        "--config",
        cfg,
        "--archive",
        str(out / "events" / "*.avro"),
        "--from",
        "2026-11-01T02:00:00Z",
        "--to",
        "2026-11-01T06:00:00Z",
    ]
    r1 = replay.run(args + ["--output", str(tmp / "r1")])
    replay.run(args + ["--output", str(tmp / "r2")])
    assert r1["labels"]["one_label_per_exposure"] and r1["labels"]["labels"] > 100
    assert file_digests(tmp / "r1") == file_digests(tmp / "r2")  # byte-identical reruns
    assert r1["replayability"]["previous_run"] is False
    again = replay.run(args + ["--output", str(tmp / "r1"), "--overwrite"])
    assert again["replayability"] == {**again["replayability"], "previous_run": True, "identical": True}
    batch_labels = {
        r["label_id"]: r for f in glob.glob(str(out / "labels" / "*.avro")) for r in fastavro.reader(open(f, "rb"))
    }
    start = 1793491200000 + 2 * 3_600_000  # 2026-11-01T02:00Z
    end = 1793491200000 + 6 * 3_600_000
    expected = sorted(k for k, r in batch_labels.items() if start <= int(r["impression_time"].timestamp() * 1000) < end)
    assert sorted(label_ids(tmp / "r1")) == expected


def test_overlapping_ranges_never_duplicate_labels(archive):
    tmp, cfg, out, _ = archive
    target = tmp / "shared"  # one run per folder: the second range replaces the first (--overwrite)
    base = ["archive", "--config", cfg, "--archive", str(out / "events" / "*.avro"), "--output", str(target)]
    replay.run(base + ["--from", "2026-11-01T02:00:00Z", "--to", "2026-11-01T05:00:00Z"])
    first = file_digests(target)
    replay.run(base + ["--from", "2026-11-01T04:00:00Z", "--to", "2026-11-01T07:00:00Z", "--overwrite"])
    second = file_digests(target)
    ids = label_ids(target)
    assert len(ids) == len(set(ids))
    shared_hour = [k for k in first if k.startswith("labels/labels-20261101T040000Z")]
    assert shared_hour and all(first[k] == second[k] for k in shared_hour)


def test_range_must_be_whole_hours(archive, capsys):
    tmp, cfg, out, _ = archive
    rc = replay.main(
        [
            "archive",
            "--config",
            cfg,
            "--archive",
            str(out / "events" / "*.avro"),
            "--output",
            str(tmp / "x"),
            "--from",
            "2026-11-01T02:30:00Z",
            "--to",
            "2026-11-01T05:00:00Z",
        ]
    )
    assert rc == 2 and "not a whole hour" in capsys.readouterr().err


def test_dead_letters_replayed_after_a_fix_are_accounted_once(archive):
    tmp, _, out, report = archive
    fixed = write_config(
        tmp,
        "validation:\n  event_types: [impression, click, view, dwell, scroll, skip, add_to_cart,"
        " purchase, hover, like]\n",
    )
    args = ["dead-letters", "--config", fixed, "--dead-letters", str(out / "dead_letter" / "*.jsonl")]
    r1 = replay.run(args + ["--output", str(tmp / "d1")])
    replay.run(args + ["--output", str(tmp / "d2")])
    dead_in = report["counts"]["dead_letter"] + report["counts"]["too_late"]
    assert r1["accounting"]["holds"] and r1["accounting"]["input_records"] == dead_in
    # The fix adds `hover` and `like`: exactly the unknown-type dead letters with another type stay.
    unknown_types = [
        json.loads(d["raw"])["event_type"]
        for f in glob.glob(str(out / "dead_letter" / "*.jsonl"))
        for d in map(json.loads, open(f))
        if d["reason"] == "unknown_event_type"
    ]
    still_unknown = sum(t not in ("hover", "like") for t in unknown_types)
    assert r1["dead_letter_by_reason"].get("unknown_event_type", 0) == still_unknown < len(unknown_types)
    still_dead = r1["counts"]["dead_letter"]
    assert (
        still_dead
        + r1["counts"]["valid"]
        + r1["counts"]["bots"]
        + r1["counts"]["duplicates"]
        + r1["counts"]["consent_dropped"]
        + r1["counts"]["too_late"]
        == dead_in
    )
    assert file_digests(tmp / "d1") == file_digests(tmp / "d2")
