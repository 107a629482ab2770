"""A real, throw-away Pub/Sub emulator for tests: Google's `pstest` fake served over gRPC.

    from tests.pubsub_emulator import pubsub_emulator   # noqa: F401  (session fixture -> "host:port")

then point the official client (and any job subprocess) at it with PUBSUB_EMULATOR_HOST=<host:port>.
Outside pytest fixtures: `with run_pubsub_emulator() as host_port: ...`.

Why pstest: Google's own emulator ships only with the gcloud SDK (Google's apt repository or its
installer), which none of the reachable package registries serves. The fake from the Go client library
(`cloud.google.com/go/pubsub/v2/pstest`) comes from the Go module proxy; tests/pubsub_emulator/main.go
serves it on a host:port and exits on SIGTERM. It speaks the same gRPC API (Publish, Pull, Acknowledge,
StreamingPull, CreateTopic/Subscription, ...) and keeps everything in memory.

The launcher is built once with `go build` into
`${XDG_CACHE_HOME:-~/.cache}/feedback-pipeline/pubsub-emulator-<hash of go.mod, go.sum, main.go>` and
reused while those files are unchanged. The first build downloads the modules pinned in go.mod/go.sum
(~2-4 min from a cold module cache on 2 cores); later builds of a changed main.go take seconds.
No Go toolchain, or a failing build, is a test FAILURE with the reason, not a skip: Go is on the
project's machines (/usr/local/go/bin/go); point $GO at another binary if needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import DIE_WITH_PARENT, executable, log_tail, serve_on_free_port, stop

SOURCE_DIR = Path(__file__).resolve().parent / "pubsub_emulator"
_SOURCES = ("go.mod", "go.sum", "main.go")
_DEFAULT_GO = "/usr/local/go/bin/go"
_BUILD_TIMEOUT_S = 20 * 60.0
_START_TIMEOUT_S = 20.0


class EmulatorUnavailable(RuntimeError):
    """Go is missing or the launcher did not build or start; the message says why."""


def go_binary() -> str:
    return executable(
        "GO",
        "go",
        _DEFAULT_GO,
        EmulatorUnavailable,
        "the Go toolchain",
        f"it is needed to build the Pub/Sub emulator in {SOURCE_DIR}. Install Go (https://go.dev/dl) or set $GO.",
    )


def source_hash() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def binary_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "feedback-pipeline" / f"pubsub-emulator-{source_hash()}"


def build_emulator() -> Path:
    """The launcher binary for the current sources: cached, or built now. Raises EmulatorUnavailable."""
    target = binary_path()
    if target.is_file() and os.access(target, os.X_OK):
        return target
    go = go_binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly", "GOTOOLCHAIN": "local"}
    cmd = [go, "build", "-trimpath", "-o", str(tmp), "."]
    print(
        f"\nbuilding the Pub/Sub emulator ({' '.join(cmd)} in {SOURCE_DIR}); the first build downloads "
        f"its Go modules and takes a few minutes",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=SOURCE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        tmp.unlink(missing_ok=True)
        raise EmulatorUnavailable(
            f"`go build` of the Pub/Sub emulator did not finish in {_BUILD_TIMEOUT_S:.0f}s; "
            f"output:\n{_tail((e.stderr or b'').decode(errors='replace'))}"
        ) from None
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EmulatorUnavailable(
            f"`go build` of the Pub/Sub emulator failed (exit code {proc.returncode}) in {SOURCE_DIR}; "
            f"the Go module proxy must be reachable for the first build. Output:\n{_tail(proc.stdout + proc.stderr)}"
        )
    os.replace(tmp, target)  # atomic: a concurrent session sees the old state or a whole binary
    print(f"built {target} in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return target


def _tail(text: str, limit: int = 4000) -> str:
    return text[-limit:] if text else "(no output)"


def _client_works(host_port: str) -> bool:
    """One real client call (ListTopics) over an insecure channel, as PUBSUB_EMULATOR_HOST would make."""
    import grpc
    from google.api_core import exceptions
    from google.pubsub_v1 import PublisherClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    channel = grpc.insecure_channel(host_port)
    try:
        client = PublisherClient(transport=PublisherGrpcTransport(channel=channel))
        list(client.list_topics(request={"project": "projects/readiness-probe"}, timeout=2))
        return True
    except (exceptions.GoogleAPICallError, exceptions.RetryError):
        return False
    finally:
        channel.close()


def _wait_until_ready(proc: subprocess.Popen, host_port: str, log_path: str) -> bool:
    """True once a client call succeeds; False if the emulator exited (e.g. the port was taken meanwhile)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if "listening on" in log_tail(log_path) and _client_works(host_port):
            return True
        time.sleep(0.1)
    stop(proc)
    raise EmulatorUnavailable(
        f"the Pub/Sub emulator on {host_port} did not answer a client call within "
        f"{_START_TIMEOUT_S:.0f}s; log:\n{log_tail(log_path)}"
    )


def _start(binary: Path, port: int, log_path: str) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(binary), "--host-port", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=DIE_WITH_PARENT,
        )


@contextlib.contextmanager
def run_pubsub_emulator() -> Iterator[str]:
    """Build (if needed) and start the emulator on a free loopback port; yield "host:port"; stop it on exit."""
    binary = build_emulator()
    with tempfile.TemporaryDirectory(prefix="pubsub-emulator-") as workdir:
        with serve_on_free_port(
            lambda port, log_path: _start(binary, port, log_path),
            lambda proc, port, log_path: _wait_until_ready(proc, f"127.0.0.1:{port}", log_path),
            workdir,
            "the Pub/Sub emulator",
            "address already in use",
            EmulatorUnavailable,
        ) as port:
            yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[str]:
    """ "host:port" of a Pub/Sub emulator shared by the test session. Tests sharing it should use their
    own project id (topics and subscriptions live under projects/<id>/...)."""
    stack = contextlib.ExitStack()
    try:
        host_port = stack.enter_context(run_pubsub_emulator())
    except EmulatorUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    with stack:
        yield host_port
