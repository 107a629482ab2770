"""One run per output folder: staging, atomic publication, `--overwrite`, and checks for readers.

A batch-style job (batch, both replay modes, pit_join) never writes straight into its `--output`:

1. `prepare` (launcher, before the pipeline is built): the folder must be empty or absent, or hold one
   of our runs and `--overwrite` was given; anything else stops the job with exit 2. It then marks the
   folder `_RUNNING` and creates `_staging-<run id>/`, which also proves the folder is writable.
2. The pipeline writes every output, report.json and quality files under the staging folder.
3. `publish` (only after the job finished and its accounting identity held): `_MANIFEST.json` is
   written in staging (every file with its relative path, record count, size and sha256, plus run id,
   job, config digest and counts), the files are moved into the folder, then the manifest, then
   `_SUCCESS` is written LAST; `_RUNNING` and the staging folder (with sinks' empty temp folders such as
   `features/.temp*`) are removed.

`_RUNNING` names the run holding the folder: run id, job, host, pid and start time. A live run is never
replaced, not even with `--overwrite` (exit 2 naming the folder and that run): a `_RUNNING` is stale, and
may be replaced by `--overwrite`, when its pid is no longer alive on this host, or when it was written on
another host more than RUNNING_LEASE_HOURS ago (its pid cannot be checked from here), or when it is not
one of ours in this format (older runs, a half-written marker). `publish` first checks that the folder's
`_RUNNING` and the staging folder are still this run's; if not (another run took the folder) it raises
RunFolderLostError and publishes nothing.

Output paths with glob characters (`*?[]`) are refused (exit 2): every reader and the used-folder
check match files by glob, where `out[7]` would mean `out7`.

A killed run leaves `_RUNNING` and/or `_staging-*` and never `_SUCCESS`, so it never looks complete;
readers skip `_staging-*` (output globs name `DIR/<output>/...`) and refuse a folder without `_SUCCESS`.
`--overwrite` removes only what it can prove is ours: files a manifest lists (the published one or a
half-published staging one), markers and staging folders. A folder holding anything else is refused
even with `--overwrite`: we never delete files we did not write.

Streaming (continuous windowed files, no end, so no staging) uses `prepare_streaming`: the same
refusal of a used folder unless `--overwrite`, and a `_STREAMING.json` marker instead of `_SUCCESS`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterable

from apache_beam.io.filesystems import FileSystems

from transforms.config import ConfigError
from transforms.io import read_all

MANIFEST = "_MANIFEST.json"
SUCCESS = "_SUCCESS"
RUNNING = "_RUNNING"
STREAMING = "_STREAMING.json"
STAGING_PREFIX = "_staging-"
MARKERS = (MANIFEST, SUCCESS, RUNNING, STREAMING)
MANIFEST_VERSION = 1
_CHUNK = 8 << 20
# A _RUNNING written on another host is taken as live for this long after its start (its pid cannot be
# checked from here); after that --overwrite may replace it. Longer than any batch run should take.
RUNNING_LEASE_HOURS = 24
GLOB_CHARS = "*?[]"
_log = logging.getLogger("pipelines.runfolder")


class OutputFolderError(ConfigError):
    """The output folder cannot take this run (used, foreign, a file, not writable): exit 2."""


class RunFolderLostError(Exception):
    """At publish time the folder's `_RUNNING` or staging folder is no longer this run's (another run
    took the folder): nothing is published."""


class UnpublishedInputError(ConfigError):
    """An input names files of a run that was not published (killed, failed, in progress): exit 2."""


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _local(path: str) -> bool:
    return "://" not in path


def _rel(root: str, path: str) -> str:
    return path[len(root.rstrip("/")) + 1 :]


def list_files(root: str) -> list[str]:
    """Every file under `root` (relative paths, sorted); [] for a missing folder."""
    if _local(root) and not os.path.isdir(root):
        return []
    try:
        matches = FileSystems.match([_join(root, "**")])[0].metadata_list
    except Exception:  # noqa: BLE001 - Beam raises its own error for an empty match on some filesystems
        return []
    return sorted(_rel(root, m.path) for m in matches)


def _read_json(path: str) -> dict | None:
    try:
        with FileSystems.open(path) as f:
            return json.loads(read_all(f, _CHUNK))
    except Exception:  # noqa: BLE001 - a missing or half-written manifest proves nothing
        return None


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _remove_empty_dirs(root: str) -> None:
    if not _local(root) or not os.path.isdir(root):
        return
    for dirpath, _dirs, _files in sorted(os.walk(root, topdown=False), key=lambda w: -len(w[0])):
        if dirpath != root.rstrip("/") and not os.listdir(dirpath):
            os.rmdir(dirpath)


# --- prepare: refuse a used folder, or remove the previous run -----------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _parse_time(text) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else None


def live_run(root: str, now: dt.datetime | None = None, host: str | None = None) -> dict | None:
    """The `_RUNNING` marker of `root` when the run it names may still be running, else None (no
    marker, or a stale one: see the module doc). `now` and `host` are for tests."""
    marker = _read_json(_join(root, RUNNING))
    if not isinstance(marker, dict) or not isinstance(marker.get("pid"), int) or not marker.get("host"):
        return None
    if marker["host"] == (host or socket.gethostname()):
        # Our own pid: a run of this process that ended (runs in one process are sequential).
        return marker if marker["pid"] != os.getpid() and _pid_alive(marker["pid"]) else None
    started = _parse_time(marker.get("started_at"))
    if started is None:
        return marker  # another host, no readable start: cannot be shown stale
    now = now or dt.datetime.now(dt.timezone.utc)
    return marker if now - started < dt.timedelta(hours=RUNNING_LEASE_HOURS) else None


def _describe_live(marker: dict) -> str:
    return (
        f"run {marker.get('run_id')} ({marker.get('job')}, pid {marker.get('pid')} on {marker.get('host')}, "
        f"started {marker.get('started_at')})"
    )


def refuse_glob_characters(root: str, flag: str = "--output") -> None:
    bad = sorted(set(root) & set(GLOB_CHARS))
    if bad:
        raise OutputFolderError(
            f"{flag} {root}: contains the glob character(s) {' '.join(bad)}, which file matching reads as "
            f"patterns (out[7] would mean out7); choose a folder name without {' '.join(GLOB_CHARS)}"
        )


def _staging_names(files: Iterable[str]) -> set[str]:
    return {f.split("/", 1)[0] for f in files if f.startswith(STAGING_PREFIX) and "/" in f}


def describe_previous(root: str, files: list[str]) -> str:
    manifest = _read_json(_join(root, MANIFEST)) if MANIFEST in files else None
    if manifest and SUCCESS in files:
        return (
            f"a published {manifest.get('job')} run ({manifest.get('run_id')}, "
            f"{len(manifest.get('files', []))} files, {manifest.get('published_at')})"
        )
    if STREAMING in files:
        return "a streaming run's output"
    return "an unfinished run (killed, failed or still running: no _SUCCESS)"


def _owned(root: str, files: list[str]) -> set[str] | None:
    """The files of `root` that earlier runs of ours wrote (provably), or None when it holds none."""
    present = set(files)
    stagings = _staging_names(files)
    streaming = STREAMING in present
    if not (present & {MANIFEST, SUCCESS, RUNNING} or stagings or streaming):
        return None
    owned = {f for f in files if f in MARKERS or f.split("/", 1)[0] in stagings}
    manifests = [_join(root, MANIFEST)] + [_join(root, s, MANIFEST) for s in stagings]
    for m in manifests:
        for entry in (_read_json(m) or {}).get("files", []):
            owned.add(entry["path"])
    if streaming:
        marker = _read_json(_join(root, STREAMING)) or {}
        tops = set(marker.get("outputs", []))
        owned |= {f for f in files if f.split("/", 1)[0] in tops}
    return owned & present


def remove_previous_run(root: str, files: list[str]) -> int:
    """Deletes a previous run of ours from `root` (see module doc); refuses anything else."""
    owned = _owned(root, files)
    if owned is None:
        raise OutputFolderError(
            f"--output {root}: the folder is not empty and does not hold a run of this project "
            f"(no {SUCCESS}, {MANIFEST}, {RUNNING} or {STAGING_PREFIX}* found); --overwrite only deletes our own "
            f"runs. Choose an empty folder or remove its contents yourself."
        )
    foreign = sorted(set(files) - owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"--output {root}: holds files no manifest of ours lists ({shown}); --overwrite refuses to delete "
            f"them. Move them away or choose another folder."
        )
    # _SUCCESS first: from here on no reader takes the folder for a complete run.
    order = sorted(owned, key=lambda f: (f != SUCCESS, f == MANIFEST, f))
    for f in order:
        FileSystems.delete([_join(root, f)])
    _remove_empty_dirs(root)
    for s in _staging_names(files):
        if _local(root) and os.path.isdir(_join(root, s)):
            os.rmdir(_join(root, s))
    return len(order)


def _check_usable(root: str, overwrite: bool, previous_manifest_out: list) -> None:
    refuse_glob_characters(root)
    if _local(root):
        if os.path.exists(root) and not os.path.isdir(root):
            raise OutputFolderError(f"--output {root}: is a file, not a folder; pass a folder path")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(
                f"--output {root}: cannot create the folder ({e.strerror}); pass a writable folder"
            ) from None
    files = list_files(root)
    if not files:
        _remove_empty_dirs(root)
        return
    live = live_run(root) if RUNNING in files else None
    if live is not None:
        raise OutputFolderError(
            f"--output {root}: {_describe_live(live)} is still running there; a run never mixes with another "
            f"and --overwrite never replaces a live run. Wait for it, stop it, or choose another folder."
        )
    if not overwrite:
        what = (
            describe_previous(root, files)
            if _owned(root, files) is not None
            else f"{len(files)} files that are not a run of this project"
        )
        raise OutputFolderError(
            f"--output {root}: the folder already holds {what}. A run never mixes with an earlier one: pass "
            f"--overwrite to replace it, or choose an empty folder."
        )
    if SUCCESS in files and MANIFEST in files:
        previous_manifest_out.append(_read_json(_join(root, MANIFEST)))
    n = remove_previous_run(root, files)
    _log.info("--overwrite: removed the previous run from %s (%d files)", root, n)


@dataclasses.dataclass
class RunFolder:
    """An output folder taken by one run. Outputs go to `.staging`; `publish` moves them into `.root`."""

    root: str
    job: str
    run_id: str
    previous_manifest: dict | None = None

    @property
    def staging(self) -> str:
        return _join(self.root, STAGING_PREFIX + self.run_id)


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def prepare(root: str, job: str, overwrite: bool) -> RunFolder:
    """Launcher-side preflight for a batch-style job; raises OutputFolderError (exit 2)."""
    previous: list = []
    _check_usable(root, overwrite, previous)
    folder = RunFolder(root.rstrip("/") or "/", job, new_run_id(), previous[0] if previous else None)
    marker = {
        "job": job,
        "run_id": folder.run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        _create_running(folder.root, json.dumps(marker).encode())
        _write_bytes(_join(folder.staging, RUNNING), folder.run_id.encode())  # creates the staging folder
    except OSError as e:
        raise OutputFolderError(f"--output {root}: not writable ({e}); pass a writable folder") from None
    return folder


def _create_running(root: str, data: bytes) -> None:
    """Writes `_RUNNING`; on a local folder only if none exists (two runs starting together: one wins,
    the other is refused with exit 2)."""
    path = _join(root, RUNNING)
    if not _local(root):
        _write_bytes(path, data)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        live = live_run(root)
        raise OutputFolderError(
            f"--output {root}: another run took the folder at the same time"
            + (f" ({_describe_live(live)})" if live else "")
            + "; choose another folder"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def prepare_streaming(root: str, overwrite: bool, outputs: Iterable[str]) -> str:
    """Streaming preflight: same refusal of a used folder, then a `_STREAMING.json` marker naming the
    output folders it will fill (so that a later --overwrite knows what it may delete)."""
    _check_usable(root, overwrite, [])
    run_id = new_run_id()
    try:
        _write_bytes(
            _join(root, STREAMING),
            json.dumps({"job": "streaming", "run_id": run_id, "outputs": sorted(outputs)}, indent=1).encode(),
        )
    except OSError as e:
        raise OutputFolderError(f"--output {root}: not writable ({e}); pass a writable folder") from None
    return run_id


# --- publish -------------------------------------------------------------------------------------


def count_records(path: str) -> int | None:
    """Records in one output file (Avro blocks, Parquet metadata, JSON lines); None for other files."""
    name = path.lower()
    with FileSystems.open(path, compression_type="uncompressed") as f:
        if name.endswith(".avro"):
            import fastavro

            return sum(block.num_records for block in fastavro.block_reader(f))
        if name.endswith(".parquet"):
            import io

            import pyarrow.parquet as pq

            return pq.ParquetFile(io.BytesIO(read_all(f, _CHUNK))).metadata.num_rows
        if name.endswith(".jsonl"):
            data = read_all(f, _CHUNK)
            return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return None


def file_entry(root: str, rel: str) -> dict:
    path = _join(root, rel)
    digest, size = hashlib.sha256(), 0
    with FileSystems.open(path, compression_type="uncompressed") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"path": rel, "records": count_records(path), "bytes": size, "sha256": digest.hexdigest()}


def config_digest(data) -> str:
    blob = data if isinstance(data, (bytes, str)) else json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode() if isinstance(blob, str) else blob).hexdigest()


def records_by_output(entries: list[dict]) -> dict:
    """Record totals per top-level output folder (events, labels, ...), from the manifest entries."""
    totals: dict = {}
    for e in entries:
        if "/" in e["path"] and e["records"] is not None and not e["path"].startswith("_"):
            top = e["path"].split("/", 1)[0]
            totals[top] = totals.get(top, 0) + e["records"]
    return dict(sorted(totals.items()))


def _is_temp(rel: str) -> bool:
    """Sinks' scratch files (Beam's `beam-temp-*`, fileio's `.temp*`, our `.tmp-*`): never published."""
    return any(part.startswith((".", "beam-temp-")) for part in rel.split("/"))


def publish(folder: RunFolder, config_sha256: str, summary: dict) -> dict:
    """Moves the staged outputs into the folder, manifest next, `_SUCCESS` last. Returns the manifest.
    Raises RunFolderLostError, publishing nothing, when the folder is no longer this run's."""
    check_still_ours(folder)
    staged = [f for f in list_files(folder.staging) if f not in MARKERS and not _is_temp(f)]
    entries = [file_entry(folder.staging, f) for f in staged]
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "job": folder.job,
        "run_id": folder.run_id,
        "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_sha256": config_sha256,
        **summary,
        "records_by_output": records_by_output(entries),
        "files": entries,
    }
    # The manifest goes into staging first: a run killed while moving files leaves it there, and the
    # next --overwrite knows which moved files were ours.
    _write_bytes(_join(folder.staging, MANIFEST), json.dumps(manifest, indent=1).encode() + b"\n")
    for rel in staged:
        dest = _join(folder.root, rel)
        if _local(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        FileSystems.rename([_join(folder.staging, rel)], [dest])
    FileSystems.rename([_join(folder.staging, MANIFEST)], [_join(folder.root, MANIFEST)])
    _write_bytes(_join(folder.root, SUCCESS), json.dumps({"run_id": folder.run_id}).encode() + b"\n")
    FileSystems.delete([_join(folder.root, RUNNING)])
    leftovers = list_files(folder.staging)
    if leftovers:
        FileSystems.delete([_join(folder.staging, f) for f in leftovers])
    if _local(folder.staging):
        _remove_empty_dirs(folder.staging)
        os.rmdir(folder.staging)
    return manifest


def check_still_ours(folder: RunFolder) -> None:
    """The folder's `_RUNNING` and the staging folder's marker must still name this run."""
    marker = _read_json(_join(folder.root, RUNNING))
    try:
        with FileSystems.open(_join(folder.staging, RUNNING), compression_type="uncompressed") as f:
            staged = read_all(f, _CHUNK).decode(errors="replace")
    except Exception:  # noqa: BLE001 - missing: the staging folder was removed
        staged = None
    owner = marker.get("run_id") if isinstance(marker, dict) else None
    if owner == folder.run_id and staged == folder.run_id:
        return
    why = (
        f"its {RUNNING} now names run {owner}"
        if owner and owner != folder.run_id
        else f"its {RUNNING} is gone"
        if owner is None
        else f"its staging folder {folder.staging} is gone"
    )
    raise RunFolderLostError(
        f"--output {folder.root}: this run ({folder.run_id}) no longer owns the folder ({why}; another run "
        f"took it, or it was cleared by hand). Nothing was published; re-run the job."
    )


# --- readers -------------------------------------------------------------------------------------


def _run_root_of(path: str, cache: dict, levels: int = 4) -> str | None:
    """The nearest folder (up to `levels` up) holding a run marker of ours, or None."""
    d = path.rsplit("/", 1)[0]
    for _ in range(levels):
        if d not in cache:
            cache[d] = any(FileSystems.exists(_join(d, m)) for m in (SUCCESS, MANIFEST, RUNNING))
        if cache[d]:
            return d
        if "/" not in d.strip("/"):
            return None
        d = d.rsplit("/", 1)[0]
    return None


def check_published(pattern: str, flag: str) -> list[str]:
    """Refuses input files of an unpublished run; checks published ones against their manifest.

    A matched file inside `_staging-*`, or under a run folder without `_SUCCESS` (or still `_RUNNING`),
    raises UnpublishedInputError (exit 2). A file under a published run must be listed in its manifest
    with the same size. Files outside any run folder of ours (streaming output, external archives) are
    accepted as they are. Returns the run folders found."""
    matches = FileSystems.match([pattern])[0].metadata_list
    roots: dict[str, dict | None] = {}
    marked: dict = {}
    for m in matches:
        if f"/{STAGING_PREFIX}" in m.path:
            raise UnpublishedInputError(
                f"{flag}: {m.path} is inside an unpublished staging folder "
                f"({STAGING_PREFIX}*); name the published outputs instead"
            )
        root = _run_root_of(m.path, marked)
        if root is None:
            continue
        if root not in roots:
            if not FileSystems.exists(_join(root, SUCCESS)) or FileSystems.exists(_join(root, RUNNING)):
                raise UnpublishedInputError(
                    f"{flag}: {root} holds an unpublished run (no {SUCCESS}: killed, failed or still running); "
                    f"its files may be incomplete. Re-run that job (with --overwrite) first."
                )
            manifest = _read_json(_join(root, MANIFEST))
            if manifest is None:
                raise UnpublishedInputError(f"{flag}: {root} has {SUCCESS} but no readable {MANIFEST}")
            roots[root] = {e["path"]: e for e in manifest.get("files", [])}
        entry = roots[root].get(_rel(root, m.path))
        if entry is None or entry["bytes"] != m.size_in_bytes:
            raise UnpublishedInputError(
                f"{flag}: {m.path} is {'not listed in' if entry is None else 'a different size than in'} "
                f"{_join(root, MANIFEST)}; the folder was changed after its run was published"
            )
    return sorted(roots)


def verify_run(root: str) -> list[str]:
    """Full check of a published run (every file's sha256 and record count against its manifest, and no
    unlisted files). Returns the problems; [] means intact. Readers check listing and size only, to
    avoid reading large inputs twice; use this where a full check is worth it (e.g. before training)."""
    files = list_files(root)
    if SUCCESS not in files or RUNNING in files:
        return [f"{root}: not a published run (no {SUCCESS}, or still {RUNNING})"]
    manifest = _read_json(_join(root, MANIFEST)) or {}
    listed = {e["path"]: e for e in manifest.get("files", [])}
    problems = [f"{p}: not listed in {MANIFEST}" for p in files if p not in listed and p not in (MANIFEST, SUCCESS)]
    for path, want in sorted(listed.items()):
        if path not in files:
            problems.append(f"{path}: listed but missing")
            continue
        try:
            got = file_entry(root, path)
        except (OSError, ValueError, EOFError) as e:  # a damaged file no longer parses
            problems.append(f"{path}: unreadable ({type(e).__name__})")
            continue
        if (got["sha256"], got["records"]) != (want["sha256"], want["records"]):
            problems.append(f"{path}: sha256/records differ from {MANIFEST}")
    return problems
