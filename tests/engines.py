"""Fixtures for running the pipelines on real engines: Prism (Go) and Apache Flink.

Tools come from the project's own install scripts (cached under
``${XDG_CACHE_HOME:-~/.cache}/feedback-pipeline``): ``.ci/install-prism`` builds Prism from the Go
module proxy; ``.ci/install-flink`` fetches Beam's Flink job server jar (Maven Central) and the
standalone Flink distribution of the same Flink version (PyPI wheels). A missing tool or a failed
download FAILS the test that needs it, with the script's own error; nothing here skips.

``flink_cluster`` starts a standalone JobManager and one TaskManager (2 slots) as two child
processes (``bin/*.sh start-foreground``), on loopback, on free ports, with a private config, log
and pid folder; it waits for ``/overview`` to list the TaskManager and stops both at session end.

Use from a test module with ``from tests.engines import *  # noqa: F401,F403`` (pytest fixtures).
"""
from __future__ import annotations

from tests.processes import free_port, stop
import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

__all__ = ["prism_binary", "flink_install", "flink_home", "flink_job_server_jar", "flink_cluster", "FlinkCluster",
           "prism_options", "flink_options"]

INSTALL_TIMEOUT_S = 30 * 60      # a cold Prism build took ~7 min on 2 cores
CLUSTER_START_TIMEOUT_S = 120    # ~30 s seen for JobManager + TaskManager to register
TASK_SLOTS = 2


def _run_install(script: str, *args: str) -> str:
    """Runs .ci/<script>; returns its stdout. On failure, fails the test with the script's stderr."""
    cmd = ["bash", str(ROOT / ".ci" / script), *args]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in {INSTALL_TIMEOUT_S} s:\n{(e.stderr or '')[-3000:]}",
                    pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}, {time.monotonic() - started:.0f} s):\n"
                    f"{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout


def _key_values(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def prism_binary() -> str:
    """Path of a Prism binary for the installed Beam version (built once, then cached)."""
    path = _run_install("install-prism").strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        pytest.fail(f".ci/install-prism printed {path!r}, which is not an executable", pytrace=False)
    return path


def prism_options(prism: str, *extra: str) -> list:
    """Beam options for PrismRunner with our locally built binary; the SDK harness runs in this
    process (LOOPBACK), so no container or Beam boot image is needed."""
    return ["--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK", *extra]


@pytest.fixture(scope="session")
def flink_home() -> str:
    """FLINK_HOME of the standalone Flink distribution (from the PyPI wheels, unpacked)."""
    home = _key_values(_run_install("install-flink", "dist"))["FLINK_HOME"]
    if not os.access(os.path.join(home, "bin", "jobmanager.sh"), os.X_OK):
        pytest.fail(f"FLINK_HOME={home} has no executable bin/jobmanager.sh", pytrace=False)
    return home


FLINK_JAR_BLOCKER = (
    "Beam's Flink job server jar (org.apache.beam:beam-runners-flink-<flink>-job-server:<beam>) is not served "
    "by the Maven registry this machine and CI reach (no beam-runners-flink-* artifact at any version; Beam Java "
    "stops before 2.77). The portable FlinkRunner cannot start without it. Provide FLINK_JOB_SERVER_JAR to run these.")


@pytest.fixture(scope="session")
def flink_job_server_jar() -> str:
    """Beam's Flink job server jar for the installed Beam version (FLINK_JOB_SERVER_JAR overrides).

    When the registry does not serve it (the case here, see FLINK_JAR_BLOCKER), the Flink tests are
    reported as xfailed with that reason -- visibly, in every run -- rather than erroring; the download
    is attempted every time, so they run for real as soon as the jar can be had. Any other install
    failure fails the tests.
    """
    cmd = ["bash", str(ROOT / ".ci" / "install-flink"), "jar"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0:
        if "Could not find artifact" in proc.stderr or "could not find artifact" in proc.stderr.lower():
            pytest.xfail(FLINK_JAR_BLOCKER)
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    jar = _key_values(proc.stdout)["FLINK_JOB_SERVER_JAR"]
    if not os.path.isfile(jar):
        pytest.fail(f".ci/install-flink printed FLINK_JOB_SERVER_JAR={jar}, which does not exist", pytrace=False)
    return jar


@pytest.fixture(scope="session")
def flink_install(flink_home, flink_job_server_jar) -> dict:
    return {"FLINK_HOME": flink_home, "FLINK_JOB_SERVER_JAR": flink_job_server_jar}


def flink_options(jar: str, master: str = "[local]", *extra: str) -> list:
    """Beam options for the portable FlinkRunner. LOOPBACK: the Python SDK harness runs in this
    process and the Flink tasks (embedded or on the loopback cluster) connect back to it."""
    return ["--runner=FlinkRunner", f"--flink_master={master}", f"--flink_job_server_jar={jar}",
            "--environment_type=LOOPBACK", *extra]




@dataclasses.dataclass
class FlinkCluster:
    home: str
    rest_port: int
    workdir: Path
    processes: dict

    @property
    def master(self) -> str:
        """For --flink_master."""
        return f"localhost:{self.rest_port}"

    def overview(self) -> dict:
        with urllib.request.urlopen(f"http://localhost:{self.rest_port}/overview", timeout=5) as r:
            return json.load(r)

    def jobs(self) -> list:
        with urllib.request.urlopen(f"http://localhost:{self.rest_port}/jobs/overview", timeout=5) as r:
            return json.load(r)["jobs"]

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for f in sorted((self.workdir / "log").glob("*")):
            text = f.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {f.name}\n{text[-chars:]}")
        return "\n".join(parts)


def _write_flink_conf(home: str, conf_dir: Path, rest_port: int, rpc_port: int) -> None:
    shutil.copytree(os.path.join(home, "conf"), conf_dir)
    cfg = yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}

    def put(path: str, value):
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    put("jobmanager.bind-host", "localhost")
    put("jobmanager.rpc.address", "localhost")
    put("jobmanager.rpc.port", rpc_port)
    put("jobmanager.memory.process.size", "1024m")
    put("taskmanager.bind-host", "localhost")
    put("taskmanager.host", "localhost")
    put("taskmanager.numberOfTaskSlots", TASK_SLOTS)
    put("taskmanager.memory.process.size", "1536m")
    put("rest.address", "localhost")
    put("rest.bind-address", "localhost")
    put("rest.port", rest_port)
    put("parallelism.default", 1)
    (conf_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))




@pytest.fixture(scope="session")
def flink_cluster(flink_home, tmp_path_factory):
    """A standalone Flink cluster (1 JobManager + 1 TaskManager with 2 slots) for the session."""
    if shutil.which("java") is None:
        pytest.fail("java is not on PATH: the Flink cluster needs Java 17", pytrace=False)
    work = tmp_path_factory.mktemp("flink-cluster")
    rest_port, rpc_port = free_port(), free_port()
    _write_flink_conf(flink_home, work / "conf", rest_port, rpc_port)
    for d in ("log", "pid"):
        (work / d).mkdir()
    env = {**os.environ, "FLINK_HOME": flink_home, "FLINK_CONF_DIR": str(work / "conf"),
           "FLINK_LOG_DIR": str(work / "log"), "FLINK_PID_DIR": str(work / "pid")}
    env.pop("HADOOP_CLASSPATH", None)
    procs = {}
    cluster = FlinkCluster(flink_home, rest_port, work, procs)
    try:
        for role in ("jobmanager", "taskmanager"):
            out = open(work / "log" / f"{role}.console", "wb")
            procs[role] = subprocess.Popen([os.path.join(flink_home, "bin", f"{role}.sh"), "start-foreground"],
                                           env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        overview = None
        while time.monotonic() < deadline:
            dead = {r: p.returncode for r, p in procs.items() if p.poll() is not None}
            if dead:
                pytest.fail(f"Flink {dead} exited during start-up:\n{cluster.log_tail()}", pytrace=False)
            try:
                overview = cluster.overview()
                if overview.get("taskmanagers", 0) >= 1 and overview.get("slots-total", 0) >= TASK_SLOTS:
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(1)
        else:
            pytest.fail(f"Flink cluster not ready after {CLUSTER_START_TIMEOUT_S} s (last /overview: {overview}):\n"
                        f"{cluster.log_tail()}", pytrace=False)
        yield cluster
    finally:
        # TaskManager first, as taskmanager.sh/jobmanager.sh stop would.
        for role in ("taskmanager", "jobmanager"):
            if role in procs:
                stop(procs[role], timeout=20)
