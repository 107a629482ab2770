"""Scale: the batch job on a standalone Flink 1.20.3 cluster with fixed TaskManager memory.

    python benchmarks/flink_scale.py --events 2000000 [--files 10] [--tm-memory 2g] [--workdir /tmp/flink-bench]
    python benchmarks/flink_scale.py --events 2000000 --tm-memory 4g --slots 1 --flink-conf
        taskmanager.memory.managed.fraction=0.1 --beam-option=--execution_mode_for_batch=BATCH_FORCED
        (one command: the settings that get 2,000,000 events through, benchmarks/RESULTS.md)
    python benchmarks/flink_scale.py --events 1500 --files 2       # tiny (tests/test_benchmarks.py)
    python benchmarks/flink_scale.py --events 200000 --engine fnapi   # the same input on FnApiRunner / prism
    # Flink's streaming translation with RocksDB state (exact at 200k, out of heap at 2M: RESULTS.md)
    python benchmarks/flink_scale.py --events 200000 --files 4 --data-stream --slots 1 \
        --flink-conf state.backend.type=rocksdb --flink-conf state.backend.rocksdb.timer-service.factory=HEAP

Generates `--events` events (split over `--files` files, one generator seed and start day each; cached
in the workdir), starts a cluster (JobManager + 2 TaskManagers, `taskmanager.memory.process.size`
fixed, `--slots` each (2), parallelism 2; tests/engines.py's FlinkCluster), runs `pipelines.batch` on
it with `--runner=FlinkRunner --flink_master=...` (with `--data-stream`: Flink's streaming translation
of the bounded job, `--use_data_stream_for_batch`, instead of its batch one), checks the accounting is
exact (input records == events generated == sum of outcomes) and prints wall time, events/s and the
peak RSS (VmHWM) of every process: JobManager, each TaskManager, the job server, the Python driver and
the SDK worker processes the TaskManagers start (PROCESS environment, pipelines/sdk_worker.py; LOOPBACK
on fnapi/prism, where the driver is the SDK harness). Stops everything it started. No assertions beyond
accounting: figures go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FN_API = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def _install(*what: str) -> dict:
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "install-flink"), *what], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def generate_input(work: Path, events: int, files: int) -> str:
    """`events` events over `files` files (cached); returns the glob."""
    folder = work / f"input-{events}-{files}"
    sizes = [events // files + (1 if i < events % files else 0) for i in range(files)]
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for i, n in enumerate(sizes):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "feedback_tools.generate",
                    "--events",
                    str(n),
                    "--seed",
                    str(100 + i),
                    "--start",
                    f"2026-11-{1 + i % 28:02d}T00:00:00Z",
                    "--output",
                    str(folder / f"events-{i}.jsonl"),
                ],
                check=True,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
        (folder / ".complete").touch()
        print(f"generated {events} events in {files} files in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return str(folder / "events-*.jsonl")


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident set size of a live process (Linux /proc VmHWM), MiB."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _processes() -> list:
    """(pid, parent pid, argv) of every live process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(entry), ppid, cmd))
    return found


def _new_processes(known: set) -> dict:
    """Name -> pid of processes to watch that appeared since: the job server the FlinkRunner launches (a
    java child of this process) and the SDK workers the watched TaskManagers start (not other clusters'
    on a shared machine)."""
    found = {}
    for pid, ppid, cmd in _processes():
        if pid in known or not cmd:
            continue
        if ppid == os.getpid() and cmd[0].endswith(b"java"):
            found["job server"] = pid
        elif ppid in known and any(arg.endswith(b"feedback-sdk-worker") for arg in cmd[:2]):
            found[f"sdk worker {pid}"] = pid
    return found


class PeakWatcher:
    """Samples VmHWM of named processes until stopped (a process's peak is lost once it exits)."""

    def __init__(self, pids: dict):
        self.pids, self.peaks, self._stop = dict(pids), {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name, pid in _new_processes(set(self.pids.values())).items():
                self.pids.setdefault(name, pid)
            for name, pid in self.pids.items():
                hwm = vm_hwm_mib(pid)
                if hwm is not None:
                    self.peaks[name] = max(self.peaks.get(name, 0), hwm)
            self._stop.wait(1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_job(input_glob: str, out: Path, beam_args: list) -> tuple:
    from pipelines import batch

    started = time.perf_counter()
    report = batch.run(
        [
            "--config",
            str(ROOT / "config" / "batch.yaml"),
            "--input",
            input_glob,
            "--output",
            str(out),
            "--warn-only",
            *beam_args,
        ]
    )
    return report, time.perf_counter() - started


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--engine", choices=["flink", "fnapi", "prism"], default="flink")
    ap.add_argument("--tm-memory", default="2g", help="taskmanager.memory.process.size")
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument(
        "--slots",
        type=int,
        default=2,
        help="task slots per TaskManager; a slot's share of managed memory (RocksDB) is the TaskManager's / slots",
    )
    ap.add_argument(
        "--data-stream",
        action="store_true",
        help="Flink: run the bounded job with Flink's streaming (DataStream) translation "
        "(--use_data_stream_for_batch): bundles of --max_bundle_size elements instead of a whole partition",
    )
    ap.add_argument(
        "--beam-option",
        action="append",
        default=[],
        metavar="--NAME=VALUE",
        help="extra Beam pipeline option for the job, e.g. --max_bundle_size=100",
    )
    ap.add_argument(
        "--flink-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Flink setting for the started cluster, e.g. taskmanager.memory.managed.fraction=0.1",
    )
    ap.add_argument(
        "--flink-master",
        help="HOST:PORT of a running cluster to use instead of starting one "
        "(the tests' session cluster); its processes are not measured",
    )
    ap.add_argument("--flink-job-server-jar", help="default: from .ci/install-flink")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "flink-bench"))
    return ap.parse_args(argv)


def _new_cluster(args, work: Path):
    """A FlinkCluster for this run, not yet started (the caller starts it inside its try/finally)."""
    from tests.engines import FlinkCluster

    return FlinkCluster(
        _install("dist")["FLINK_HOME"],
        Path(tempfile.mkdtemp(prefix="cluster-", dir=work)),
        taskmanagers=2,
        slots=args.slots,
        tm_memory=args.tm_memory,
        parallelism=args.parallelism,
        extra_conf=dict(kv.split("=", 1) for kv in args.flink_conf),
    )


def _prism_args() -> list:
    from tests.engines import install_prism, prism_options

    return prism_options(install_prism())


def _result(args, cluster, report: dict, seconds: float, peaks: dict, exact: bool) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "engine": args.engine,
        "events": args.events,
        "files": args.files,
        "taskmanager_memory": args.tm_memory if cluster is not None else None,
        "slots_per_taskmanager": args.slots if cluster is not None else None,
        "flink_conf": args.flink_conf,
        "beam_options": args.beam_option,
        "parallelism": args.parallelism if args.engine == "flink" else None,
        "flink_translation": ("DataStream" if args.data_stream else "DataSet") if args.engine == "flink" else None,
        "wall_s": round(seconds, 1),
        "events_per_s": round(args.events / seconds),
        "peak_rss_mib": peaks,
        "accounting_exact": exact,
        "counts": report["counts"],
    }


def main(argv=None) -> dict:
    args = _parse_args(argv)
    # Before the cluster starts: its TaskManagers start the SDK workers, which read the key from their
    # environment (a real deployment sets it on every worker host, or mounts privacy.key_file).
    os.environ.setdefault("FEEDBACK_HMAC_KEY", "benchmark-key")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    input_glob = generate_input(work, args.events, args.files)
    out = work / f"out-{args.engine}-{args.events}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cluster = None
    try:
        driver = "driver (python)" if args.engine == "flink" else "driver (python, SDK harness)"
        pids = {driver: os.getpid()}
        if args.engine == "flink":
            jar = args.flink_job_server_jar or _install("jar")["FLINK_JOB_SERVER_JAR"]
            master = args.flink_master
            if master is None:
                cluster = _new_cluster(args, work)
                cluster.start()
                master = cluster.master
                pids.update({name: p.pid for name, p in cluster.processes.items()})
            from tests.engines import flink_options

            data_stream = ["--use_data_stream_for_batch"] if args.data_stream else []
            beam_args = flink_options(jar, master, f"--parallelism={args.parallelism}", *data_stream, *args.beam_option)
        elif args.engine == "prism":
            beam_args = _prism_args()
        else:
            beam_args = [f"--runner={FN_API}"]
        with PeakWatcher(pids) as watcher:
            report, seconds = run_job(input_glob, out, beam_args)
        acc = report["accounting"]
        exact = acc["holds"] and acc["input_records"] == args.events
        peaks = {name: round(mib) for name, mib in watcher.peaks.items()}
        peaks[driver] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result = _result(args, cluster, report, seconds, peaks, exact)
        print(json.dumps(result, indent=2))
        if not exact:
            raise SystemExit(f"accounting not exact: {acc} for {args.events} generated events")
        return result
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
