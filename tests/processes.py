"""What every test fixture that starts a real server needs: its executable, a free loopback port, a
child that dies with the test process, a polite-then-firm stop, and a retry on another port when the
chosen one was taken meanwhile (`serve_on_free_port`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():  # Linux: the child gets SIGTERM if the test process dies without cleaning up
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # best effort: without it, the fixture's own stop() still ends the child


DIE_WITH_PARENT = _die_with_parent if sys.platform == "linux" else None


def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def executable(env_var: str, name: str, default: str, missing: type[Exception], what: str, why: str) -> str:
    """$env_var, else `name` on PATH, else `default`, if that is an executable file; else raises
    `missing` saying where it looked for `what`, then `why`."""
    candidate = os.environ.get(env_var) or shutil.which(name) or default
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        raise missing(f"{what} was not found (looked for ${env_var}, {name} on PATH, {default}); {why}")
    return candidate


def log_tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def serve_on_free_port(
    start: Callable[[int, str], subprocess.Popen],
    ready: Callable[[subprocess.Popen, int, str], bool],
    log_dir: str,
    what: str,
    port_taken: str,
    failure: type[Exception],
    attempts: int = 5,
) -> Iterator[int]:
    """Starts a server on a free loopback port, yields the port once it is ready, stops it on exit.

    `start(port, log_path)` launches it, logging to log_path; `ready(proc, port, log_path)` is True once
    it answers, False if it exited (and raises on its own timeout). When it exited and its log says
    `port_taken` (another process took the port meanwhile), it starts again on another port; else
    `failure` is raised, naming `what` and quoting the log."""
    for attempt in range(attempts):
        port = free_port()
        log_path = os.path.join(log_dir, f"attempt-{attempt}.log")
        proc = start(port, log_path)
        try:
            if ready(proc, port, log_path):
                yield port
                return
        finally:
            stop(proc)
        if port_taken not in log_tail(log_path):
            break
    raise failure(f"{what} did not start (exit code {proc.returncode}); log:\n{log_tail(log_path)}")
