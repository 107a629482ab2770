"""Fixtures for running the pipelines on real engines: Prism (Go) and Apache Flink.

Tools come from the project's own install scripts (cached under
``${XDG_CACHE_HOME:-~/.cache}/feedback-pipeline``): ``.ci/install-prism`` builds Prism from the Go
module proxy; ``.ci/install-flink`` builds Beam's Flink 1.20 job server from source with
``../shared/flink-job-server/build.sh`` (the Maven registry here serves no ``beam-runners-flink-*``
jar; ``FLINK_JOB_SERVER_JAR`` / ``FLINK_JOB_SERVER_DIR`` override) and assembles the standalone Flink
1.20.3 distribution from PyPI. A missing tool or a failed download FAILS the test that needs it,
with the script's own error; nothing here skips.

``flink_cluster`` starts a standalone JobManager and two TaskManagers (2 slots each) as separate
child processes (``bin/*.sh start-foreground``), on loopback, on free ports, with a private config,
log and pid folder, a fixed-delay restart strategy; it waits for ``/overview`` to list both
TaskManagers and stops every process at session end (``FlinkCluster`` also serves the benchmark).

Use from a test module with ``from tests.engines import *  # noqa: F401,F403`` (pytest fixtures).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.launcher import PRISM_NO_SPLIT_EXPERIMENT
from tests.conftest import ROOT
from tests.processes import DIE_WITH_PARENT, free_port, stop

__all__ = [
    "prism_binary",
    "flink_install",
    "flink_home",
    "flink_job_server_jar",
    "flink_cluster",
    "FlinkCluster",
    "FlinkClusterError",
    "prism_options",
    "install_prism",
    "flink_options",
    "flink_cluster_job_server",
    "portable_options",
    "sdk_worker_options",
]

INSTALL_TIMEOUT_S = 30 * 60  # a cold Prism build took ~7 min on 2 cores
CLUSTER_START_TIMEOUT_S = 120  # ~30 s seen for JobManager + TaskManager to register


def _run_install(script: str, *args: str) -> str:
    """Runs .ci/<script>; returns its stdout. On failure, fails the test with the script's stderr."""
    cmd = ["bash", str(ROOT / ".ci" / script), *args]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {INSTALL_TIMEOUT_S} s:\n{(e.stderr or '')[-3000:]}", pytrace=False
        )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed (exit {proc.returncode}, {time.monotonic() - started:.0f} s):\n"
            f"{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return proc.stdout


def _key_values(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def install_prism() -> str:
    """Path of a Prism binary for the installed Beam version (built once by .ci/install-prism, then
    cached). Usable outside pytest (benchmarks/): a failure raises with the script's stderr."""
    path = _run_install("install-prism").strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        pytest.fail(f".ci/install-prism printed {path!r}, which is not an executable", pytrace=False)
    return path


@pytest.fixture(scope="session")
def prism_binary() -> str:
    return install_prism()


def prism_options(prism: str, *extra: str) -> list:
    """Beam options for PrismRunner with our locally built binary; the SDK harness runs in this
    process (LOOPBACK), so no container or Beam boot image is needed."""
    return [
        "--runner=PrismRunner",
        f"--prism_location={prism}",
        "--environment_type=LOOPBACK",
        f"--experiments={PRISM_NO_SPLIT_EXPERIMENT}",  # see pipelines/launcher.py
        *extra,
    ]


# --- Flink ------------------------------------------------------------------------------------------


class FlinkClusterError(RuntimeError):
    pass


@pytest.fixture(scope="session")
def flink_home() -> str:
    """FLINK_HOME of the standalone Flink 1.20.3 distribution (PyPI wheel + sdist, assembled)."""
    home = _key_values(_run_install("install-flink", "dist"))["FLINK_HOME"]
    if not os.access(os.path.join(home, "bin", "jobmanager.sh"), os.X_OK):
        pytest.fail(f"FLINK_HOME={home} has no executable bin/jobmanager.sh", pytrace=False)
    return home


@pytest.fixture(scope="session")
def flink_job_server_jar() -> str:
    """A runnable Beam Flink 1.20 job server jar (for --flink_job_server_jar): FLINK_JOB_SERVER_JAR, or
    the shared source build (FLINK_JOB_SERVER_DIR or ../shared/flink-job-server/build.sh) wrapped by
    .ci/install-flink in a launcher jar. Any failure fails the tests that need it."""
    jar = _key_values(_run_install("install-flink", "jar"))["FLINK_JOB_SERVER_JAR"]
    if not os.path.isfile(jar):
        pytest.fail(f".ci/install-flink printed FLINK_JOB_SERVER_JAR={jar}, which does not exist", pytrace=False)
    return jar


@pytest.fixture(scope="session")
def flink_install(flink_home, flink_job_server_jar) -> dict:
    return {"FLINK_HOME": flink_home, "FLINK_JOB_SERVER_JAR": flink_job_server_jar}


def sdk_worker_options() -> list:
    """SDK harness flags for a multi-TaskManager cluster: each TaskManager starts its own Python SDK
    workers through the project's PROCESS-environment boot (pipelines/sdk_worker.py, installed as the
    `feedback-sdk-worker` script beside this interpreter). LOOPBACK would share one worker pool between
    TaskManagers whose worker ids collide (see pipelines/sdk_worker.py), ending each other's harnesses."""
    boot = Path(sys.executable).with_name("feedback-sdk-worker")
    if not os.access(boot, os.X_OK):
        pytest.fail(f"{boot} is missing: run `bash .ci/bootstrap` (pip install -e .) to install it", pytrace=False)
    return ["--environment_type=PROCESS", "--environment_config=" + json.dumps({"command": str(boot)})]


def flink_options(jar: str, master: str = "[local]", *extra: str) -> list:
    """Beam options for the portable FlinkRunner (the standard flags). Embedded Flink ([local], one JVM):
    LOOPBACK, the Python SDK harness runs in this process. A cluster: PROCESS workers per TaskManager."""
    harness = ["--environment_type=LOOPBACK"] if master == "[local]" else sdk_worker_options()
    return ["--runner=FlinkRunner", f"--flink_master={master}", f"--flink_job_server_jar={jar}", *harness, *extra]


JOBMANAGER = "jobmanager"


@dataclasses.dataclass
class FlinkCluster:
    """A standalone Flink session cluster on loopback: one JobManager and `taskmanagers` TaskManagers,
    each its own `bin/<role>.sh start-foreground` process (a JVM), with a private config, log folder and
    free ports. A fixed-delay restart strategy and short heartbeats let a job survive a lost TaskManager.
    Usable outside pytest (benchmarks/flink_scale.py): start() / stop() raise FlinkClusterError."""

    home: str
    workdir: Path
    taskmanagers: int = 2
    slots: int = 2
    tm_memory: str = "2g"  # 256m of it task off-heap (gRPC data plane): ~430 MB heap
    jm_memory: str = "1024m"
    parallelism: int = 2
    extra_conf: dict = dataclasses.field(default_factory=dict)
    rest_port: int = 0
    processes: dict = dataclasses.field(default_factory=dict)  # name -> Popen
    _started_tms: int = 0

    @property
    def master(self) -> str:
        """For --flink_master / the job server's --flink-master."""
        return f"localhost:{self.rest_port}"

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://localhost:{self.rest_port}{path}", timeout=10) as r:
            return json.load(r)

    def overview(self) -> dict:
        return self._get("/overview")

    def jobs(self) -> list:
        return self._get("/jobs/overview")["jobs"]

    def job(self, jid: str) -> dict:
        return self._get(f"/jobs/{jid}")

    def job_exceptions(self, jid: str) -> dict:
        return self._get(f"/jobs/{jid}/exceptions")

    def cancel_job(self, jid: str) -> None:
        """Flink REST cancel (Beam's PipelineResult.cancel() does not stop a job on this job server)."""
        req = urllib.request.Request(f"http://localhost:{self.rest_port}/jobs/{jid}?mode=cancel", method="PATCH")
        urllib.request.urlopen(req, timeout=10).close()

    def taskmanager_names(self) -> list:
        return [n for n in self.processes if n != JOBMANAGER and self.processes[n].poll() is None]

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for f in sorted((self.workdir / "log").glob("**/*")):
            if f.is_file() and f.stat().st_size:
                parts.append(f"--- {f.relative_to(self.workdir)}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def _write_conf(self, rpc_port: int) -> None:
        conf_dir = self.workdir / "conf"
        shutil.copytree(os.path.join(self.home, "conf"), conf_dir)
        cfg = yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}
        settings = {
            "jobmanager.bind-host": "localhost",
            "jobmanager.rpc.address": "localhost",
            "jobmanager.rpc.port": rpc_port,
            "jobmanager.memory.process.size": self.jm_memory,
            "taskmanager.bind-host": "localhost",
            "taskmanager.host": "localhost",
            "taskmanager.numberOfTaskSlots": self.slots,
            "taskmanager.memory.process.size": self.tm_memory,
            "rest.address": "localhost",
            "rest.bind-address": "localhost",
            "rest.port": self.rest_port,
            "parallelism.default": self.parallelism,
            # Work lands on every TaskManager, so losing one really interrupts the job.
            "cluster.evenly-spread-out-slots": True,
            # Recovery: restart on the remaining slots; notice a dead TaskManager within seconds. Region
            # failover counts one attempt per failed region, and a lost TaskManager fails ~10 regions of
            # Beam's batch job at once (5 attempts were used up by one kill), hence the generous count.
            "jobmanager.execution.failover-strategy": "region",
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": 100,
            "restart-strategy.fixed-delay.delay": "2 s",
            "heartbeat.interval": 2000,
            "heartbeat.timeout": 15000,
            # Beam's batch translation has many blocking exchanges; Flink's sort-merge shuffle reserves
            # 512 buffers for each by default, which ran out at parallelism 2 (14k buffers of 16 kb).
            "taskmanager.network.sort-shuffle.min-buffers": 64,
            "taskmanager.memory.segment-size": "16kb",
            "taskmanager.memory.network.fraction": 0.2,
            "taskmanager.memory.managed.fraction": 0.3,
            # Beam's gRPC data plane to the SDK workers buffers in JVM direct memory outside Flink's
            # network pool; the default task off-heap size is 0, and a 200k-event job died with
            # `OutOfMemoryError: Direct buffer memory` while the TaskManager pushed elements to a slower
            # Python worker. Taken from taskmanager.memory.process.size, so the total stays fixed.
            "taskmanager.memory.task.off-heap.size": "256m",
            **self.extra_conf,
        }
        for path, value in settings.items():  # config.yaml nests keys by their dots
            node = cfg
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        (conf_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def _spawn(self, role: str, name: str) -> None:
        log_dir = self.workdir / "log" / name
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "FLINK_HOME": self.home,
            "FLINK_CONF_DIR": str(self.workdir / "conf"),
            "FLINK_LOG_DIR": str(log_dir),
            "FLINK_PID_DIR": str(self.workdir / "pid"),
        }
        env.pop("HADOOP_CLASSPATH", None)
        # The TaskManagers start the Python SDK workers (PROCESS environment): they import the project from
        # the venv, and tests' own modules (tests/helpers.py functions pickled into a pipeline) from here.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        out = open(log_dir / "console.log", "wb")
        # start-foreground execs the JVM: this Popen's pid is the JobManager / TaskManager itself.
        self.processes[name] = subprocess.Popen(
            [os.path.join(self.home, "bin", f"{role}.sh"), "start-foreground"],
            env=env,
            cwd=self.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=DIE_WITH_PARENT,
        )

    def _wait_for(self, what: str, ready, timeout: float = CLUSTER_START_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None and n in self._expected}
            if dead:
                raise FlinkClusterError(f"Flink {dead} exited while waiting for {what}:\n{self.log_tail()}")
            try:
                last = self.overview()
                if ready(last):
                    return last
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(1)
        raise FlinkClusterError(f"Flink: no {what} after {timeout:.0f} s (last /overview: {last}):\n{self.log_tail()}")

    def start(self) -> FlinkCluster:
        if shutil.which("java") is None:
            raise FlinkClusterError("java is not on PATH: the Flink cluster needs Java 17")
        self.rest_port = self.rest_port or free_port()
        self._write_conf(free_port())
        (self.workdir / "pid").mkdir(parents=True, exist_ok=True)
        self._expected = {JOBMANAGER}
        self._spawn(JOBMANAGER, JOBMANAGER)
        for _ in range(self.taskmanagers):
            self.start_taskmanager(wait=False)
        want = self.taskmanagers
        self._wait_for(
            f"{want} TaskManagers",
            lambda o: o.get("taskmanagers", 0) >= want and o.get("slots-total", 0) >= want * self.slots,
        )
        return self

    def start_taskmanager(self, wait: bool = True) -> str:
        self._started_tms += 1
        name = f"taskmanager-{self._started_tms}"
        self._expected.add(name)
        self._spawn("taskmanager", name)
        if wait:
            want = len(self.taskmanager_names())
            self._wait_for(f"{want} TaskManagers", lambda o: o.get("taskmanagers", 0) >= want)
        return name

    def kill_taskmanager(self, name: str) -> None:
        """SIGKILL: the process gets no chance to deregister or flush anything."""
        self._expected.discard(name)
        self.processes[name].kill()
        self.processes[name].wait(10)

    def stop(self) -> None:
        self._expected = set()
        for name in [n for n in self.processes if n != JOBMANAGER] + [JOBMANAGER]:  # TaskManagers first
            stop(self.processes[name], timeout=20)


@pytest.fixture(scope="session")
def flink_cluster(flink_home, tmp_path_factory):
    """A standalone Flink 1.20.3 cluster (JobManager + 2 TaskManagers, 2 slots each) for the session."""
    cluster = FlinkCluster(flink_home, tmp_path_factory.mktemp("flink-cluster"))
    try:
        cluster.start()
    except FlinkClusterError as e:
        cluster.stop()
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def portable_options(endpoint: str, *extra: str) -> list:
    """Beam options for the cluster's job server, already running (PortableRunner --job_endpoint)."""
    return ["--runner=PortableRunner", f"--job_endpoint={endpoint}", *sdk_worker_options(), *extra]


@pytest.fixture(scope="session")
def flink_cluster_job_server(flink_job_server_jar, flink_cluster, tmp_path_factory):
    """One job server for the session, submitting to the standalone cluster; its endpoint. Beam's
    FlinkRunner starts a new job server JVM (~600 MB) per pipeline and stops it only when Python exits,
    so all but the tests of the FlinkRunner flags themselves share this one."""
    import socket

    port = free_port()
    log = open(tmp_path_factory.mktemp("flink-job-server") / "job-server.log", "wb")
    proc = subprocess.Popen(
        [
            "java",
            "-jar",
            flink_job_server_jar,
            "--flink-master",
            flink_cluster.master,
            "--job-port",
            str(port),
            "--artifact-port",
            "0",
            "--expansion-port",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=DIE_WITH_PARENT,
    )
    try:
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the Flink job server exited (code {proc.returncode}); see {log.name}", pytrace=False)
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the Flink job server did not listen on {port}; see {log.name}", pytrace=False)
                time.sleep(0.5)
        yield f"localhost:{port}"
    finally:
        stop(proc, timeout=20)
