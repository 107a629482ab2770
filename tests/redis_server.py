"""A real, throw-away redis-server for tests.

    from tests.redis_server import redis_server   # noqa: F401  (session fixture -> (host, port))

or, outside pytest fixtures, `with run_redis_server("--requirepass", "pw") as (host, port): ...`.

The server listens on a free loopback port, keeps nothing on disk (`--save "" --appendonly no`, working
dir in a temp folder) and is killed when the context exits. A missing binary is a test FAILURE, not a
skip: install it with `apt-get install redis-server` (or point $REDIS_SERVER at a binary).
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.processes import DIE_WITH_PARENT, executable, log_tail, serve_on_free_port, stop

_DEFAULT_BINARY = "/usr/bin/redis-server"
_START_TIMEOUT_S = 15.0


class RedisServerMissing(RuntimeError):
    pass


def redis_server_binary() -> str:
    return executable(
        "REDIS_SERVER",
        "redis-server",
        _DEFAULT_BINARY,
        RedisServerMissing,
        "redis-server",
        "these tests need a real Redis: run `apt-get install redis-server` (Debian/Ubuntu).",
    )


def _wait_for_ping(proc: subprocess.Popen, port: int, log_path: str) -> bool:
    """True once the server answers PING; False if it exited (e.g. the port was taken meanwhile)."""
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.AuthenticationError:
                return True  # up, and asking for a password (--requirepass)
            except redis.ResponseError as e:
                if "NOAUTH" in str(e):
                    return True
                raise
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.05)
    finally:
        client.close()
    stop(proc)
    raise RuntimeError(
        f"redis-server on port {port} did not answer PING within {_START_TIMEOUT_S}s; log:\n{log_tail(log_path)}"
    )


def _start(binary: str, port: int, workdir: str, log_path: str, extra_args: tuple) -> subprocess.Popen:
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        workdir,
        "--daemonize",
        "no",
        "--logfile",
        log_path,
        *extra_args,
    ]
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=DIE_WITH_PARENT,
    )


@contextlib.contextmanager
def run_redis_server(*extra_args: str) -> Iterator[tuple[str, int]]:
    """Start redis-server on a free loopback port, yield (host, port), kill it on exit.

    `extra_args` are passed through (e.g. "--requirepass", "secret"). Raises RedisServerMissing when
    the binary is not installed."""
    binary = redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="redis-test-") as workdir:
        with serve_on_free_port(
            lambda port, log_path: _start(binary, port, workdir, log_path, extra_args),
            _wait_for_ping,
            workdir,
            "redis-server",
            "Address already in use",
            RuntimeError,
        ) as port:
            yield "127.0.0.1", port


def _require_binary() -> None:
    try:
        redis_server_binary()
    except RedisServerMissing as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[tuple[str, int]]:
    """(host, port) of a redis-server shared by the test session (no password, db 0). Tests sharing it
    should use their own key prefixes rather than FLUSHDB."""
    _require_binary()
    with run_redis_server() as address:
        yield address


REDIS_TEST_PASSWORD = "test-redis-password"


@pytest.fixture(scope="session")
def redis_server_with_password() -> Iterator[tuple[str, int]]:
    """(host, port) of a second server started with --requirepass REDIS_TEST_PASSWORD."""
    _require_binary()
    with run_redis_server("--requirepass", REDIS_TEST_PASSWORD) as address:
        yield address
